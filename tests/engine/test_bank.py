"""The BankStore facade on a real SQLite catalog, real blob files and a real FAISS index."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from kvstore.bank import BankStore
from kvstore.errors import (
    Conflict,
    IncompatibleModel,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
    VersionMismatch,
)
from kvstore.storage.catalog import BlockRow, DocumentRow
from kvstore.types import SearchFilter
from tests.conftest import build_tiny

NORMANS = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. "
           "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")
PARIS = "Paris is the capital and most populous city of France. The Seine flows through it."
PHOTO = "Photosynthesis converts light energy into chemical energy stored in glucose."


@pytest.fixture
def store(make_store: Callable[..., BankStore]) -> BankStore:
    s = make_store()
    s.create_bank("kb")
    s.put_document("kb", "normans", NORMANS, metadata={"topic": "history"}, tags=["europe"], agent="alice")
    s.put_document("kb", "paris", PARIS, metadata={"topic": "geo"}, tags=["europe", "city"], agent="bob")
    s.put_document("kb", "photo", PHOTO, metadata={"topic": "bio"}, agent="bob")
    return s


def _counts(store: BankStore) -> tuple[int, int, int]:
    with store.session() as s:
        docs = s.scalar(select(func.count()).select_from(DocumentRow))
        blocks = s.scalar(select(func.count()).select_from(BlockRow))
    return int(docs or 0), int(blocks or 0), len(list(store.blobs.ids()))


def test_search_ranks_the_relevant_document_first(store: BankStore) -> None:
    hits = store.search("kb", "Who were the Normans?", k=3)
    assert hits[0].doc_id == "normans" and hits[0].score > hits[1].score
    assert hits[0].metadata == {"topic": "history"} and hits[0].agent == "alice"


def test_filters_apply_before_top_k(store: BankStore) -> None:
    hits = store.search("kb", "Who were the Normans?", k=2, filter=SearchFilter(agent="bob"))
    assert {h.doc_id for h in hits} == {"paris", "photo"}
    assert [h.doc_id for h in store.search("kb", "x", k=5, filter=SearchFilter(tags=["city"]))] == ["paris"]
    assert [h.doc_id for h in store.search("kb", "x", k=5, filter=SearchFilter(metadata={"topic": "bio"}))] == [
        "photo"]


@pytest.mark.parametrize("mode", ["kv", "text"])
def test_query_answers_with_sources_and_timings(store: BankStore, mode: str) -> None:
    result = store.query("kb", "Who were the Normans?", k=2, mode=mode, max_new_tokens=4)  # type: ignore[arg-type]
    assert result.mode == mode and result.sources[0].doc_id == "normans"
    assert result.usage.generated_tokens <= 4 and result.usage.question_tokens > 0
    assert result.usage.context_tokens == sum(len(store.runner.tokenize(h.text)) for h in result.sources)
    t = result.timings
    assert 0 < t.ttft_ms <= t.total_ms and t.retrieve_ms > 0


def test_kv_and_text_mode_agree_for_one_block(store: BankStore) -> None:
    kv = store.query("kb", "Who were the Normans?", k=1, mode="kv", max_new_tokens=8)
    text = store.query("kb", "Who were the Normans?", k=1, mode="text", max_new_tokens=8)
    assert kv.answer == text.answer


def test_streaming_tokens_add_up_to_the_answer(store: BankStore) -> None:
    pieces: list[str] = []
    result = store.query("kb", "Who were the Normans?", k=2, max_new_tokens=6, on_token=pieces.append)
    assert "".join(pieces).strip() == result.answer


def test_restart_gives_the_same_hits_and_answers(store: BankStore, make_store: Callable[..., BankStore]) -> None:
    before_hits = store.search("kb", "capital of France", k=3)
    before = store.query("kb", "capital of France", k=2, max_new_tokens=6)
    store.close()
    reopened = make_store()
    assert reopened.search("kb", "capital of France", k=3) == before_hits
    assert reopened.query("kb", "capital of France", k=2, max_new_tokens=6).answer == before.answer
    assert reopened.stats("kb").index_entries == 3


def test_restart_without_snapshot_replays_or_rebuilds(store: BankStore, make_store: Callable[..., BankStore]) -> None:
    # No close(): the process "died"; the index is rebuilt from the catalog.
    hits = store.search("kb", "photosynthesis", k=1)
    reopened = make_store()
    assert reopened.search("kb", "photosynthesis", k=1) == hits
    # A snapshot, then more writes, then a crash: the op-log tail is replayed onto the snapshot.
    reopened.close()
    again = make_store()
    again.put_document("kb", "late", "A late document about volcanoes and lava.")
    again.delete_document("kb", "photo")
    replayed = make_store()
    assert replayed.stats("kb").index_entries == 3
    assert replayed.search("kb", "volcanoes lava", k=1)[0].doc_id == "late"


def test_same_text_is_a_noop_and_new_text_is_a_new_version(store: BankStore) -> None:
    docs, blocks, blobs = _counts(store)
    again = store.put_document("kb", "paris", PARIS, metadata={"topic": "geo"}, tags=["europe", "city"], agent="bob")
    assert not again.changed and again.document.version == 1 and _counts(store) == (docs, blocks, blobs)
    updated = store.put_document("kb", "paris", "Lyon is a large city in France, on the Rhone.", agent="bob")
    assert updated.changed and not updated.created and updated.document.version == 2
    assert _counts(store) == (docs, blocks, blobs)  # old block and blob retired with the new ones in
    assert store.search("kb", "Lyon Rhone", k=1)[0].doc_id == "paris"
    assert "Seine" not in store.get_document("kb", "paris").text  # type: ignore[operator]


def test_if_match_guards_concurrent_writers(store: BankStore) -> None:
    with pytest.raises(VersionMismatch):
        store.put_document("kb", "paris", "Changed text about Paris.", if_match=5)
    with pytest.raises(VersionMismatch):
        store.put_document("kb", "brand-new", "Some text.", if_match=1)
    assert store.put_document("kb", "brand-new", "Some text.", if_match=0).created
    assert store.put_document("kb", "paris", "Changed text about Paris.", if_match=1).document.version == 2


def test_delete_removes_document_blocks_blobs_and_index_entries(store: BankStore) -> None:
    store.delete_document("kb", "photo")
    assert _counts(store) == (2, 2, 2)
    assert store.stats("kb").index_entries == 2
    with pytest.raises(NotFound):
        store.get_document("kb", "photo")


def test_stats_report_sizes(store: BankStore) -> None:
    st = store.stats("kb")
    assert (st.documents, st.blocks) == (3, 3) and st.tokens > 0
    assert st.raw_bytes == st.tokens * store.runner.bytes_per_token_fp16
    assert 0 < st.stored_bytes and st.compression_ratio == pytest.approx(st.raw_bytes / st.stored_bytes, rel=1e-3)


def test_list_documents_pages_with_a_cursor(store: BankStore) -> None:
    page1, cursor = store.list_documents("kb", limit=2)
    page2, end = store.list_documents("kb", cursor=cursor, limit=2)
    assert [d.doc_id for d in page1 + page2] == ["normans", "paris", "photo"] and end is None


@pytest.mark.parametrize(("doc_id", "text", "error"), [
    ("ok", "", ValidationFailed),
    ("ok", "   ", ValidationFailed),
    ("../etc/passwd", "text", ValidationFailed),
    ("a/b", "text", ValidationFailed),
    ("", "text", ValidationFailed),
    ("ok", "x" * 300_001, PayloadTooLarge),
])
def test_bad_documents_are_refused_and_change_nothing(store: BankStore, doc_id: str, text: str,
                                                      error: type[Exception]) -> None:
    before = _counts(store)
    with pytest.raises(error):
        store.put_document("kb", doc_id, text)
    assert _counts(store) == before


def test_bad_metadata_and_unknown_banks(store: BankStore) -> None:
    before = _counts(store)
    with pytest.raises(ValidationFailed):
        store.put_document("kb", "m", "text", metadata={"x": "y" * 20_000})
    with pytest.raises(ValidationFailed):
        store.put_document("kb", "m", "text", tags=[1, 2])  # type: ignore[list-item]
    with pytest.raises(NotFound):
        store.put_document("nope", "m", "text")
    with pytest.raises(NotFound):
        store.query("nope", "q")
    with pytest.raises(ValidationFailed):
        store.query("kb", "q", k=0)
    with pytest.raises(ValidationFailed):
        store.query("kb", "q", max_new_tokens=10_000)
    assert _counts(store) == before


def test_bank_names_are_validated_and_unique(store: BankStore) -> None:
    for bad in ("", "UPPER", "-x", "a" * 64, "../x", "a b"):
        with pytest.raises(ValidationFailed):
            store.create_bank(bad)
    with pytest.raises(Conflict):
        store.create_bank("kb")


def test_a_corrupt_blob_is_rebuilt_from_text(store: BankStore) -> None:
    store.hot.budget_bytes = 0  # force reads from disk
    hit = store.search("kb", "Who were the Normans?", k=1)[0]
    with store.session() as s:
        blob_id = s.scalar(select(BlockRow.blob_id).where(BlockRow.id == hit.block_id))
    assert blob_id
    store.hot.discard_everywhere(blob_id)  # ingest decoded it into the hot tier (kvstore.memory.warmup): read the blob
    path = store.blobs._path(blob_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reference = store.query("kb", "Who were the Normans?", k=1, mode="text", max_new_tokens=6).answer
    assert store.query("kb", "Who were the Normans?", k=1, max_new_tokens=6).answer == reference
    assert store.verify("kb") == {"checked": 3, "rebuilt": 0}


def test_verify_rebuilds_missing_and_truncated_blobs(store: BankStore) -> None:
    with store.session() as s:
        blob_ids = list(s.scalars(select(BlockRow.blob_id)))
    store.blobs._path(blob_ids[0]).unlink()  # type: ignore[arg-type]
    path = store.blobs._path(blob_ids[1])  # type: ignore[arg-type]
    path.write_bytes(path.read_bytes()[:50])
    assert store.verify("kb") == {"checked": 3, "rebuilt": 2}
    assert store.stats("kb").quarantined_blocks == 0


def test_a_bank_of_another_model_is_refused(store: BankStore, make_store: Callable[..., BankStore]) -> None:
    other = make_store(llm=build_tiny("llama", seed=1))
    with pytest.raises(IncompatibleModel):
        other.query("kb", "Who were the Normans?")
    with pytest.raises(IncompatibleModel):
        other.put_document("kb", "x", "text")


def test_delete_bank_removes_everything(store: BankStore) -> None:
    store.delete_bank("kb")
    assert _counts(store) == (0, 0, 0)
    with pytest.raises(NotFound):
        store.stats("kb")


def test_a_bank_created_without_a_codec_records_what_auto_resolved_to(make_store: Callable[..., BankStore]) -> None:
    store = make_store()
    assert store.settings.default_codec == "auto"
    store.create_bank("plain")
    assert store.get_bank("plain").codec == "int8"  # the tiny model has no calibration: no tklt5


def test_auto_named_on_create_or_update_resolves_like_the_default(make_store: Callable[..., BankStore]) -> None:
    store = make_store()
    assert store.create_bank("named", codec="auto").codec == "int8"
    store.update_bank("named", codec="fp16")
    assert store.update_bank("named", codec="auto").codec == "int8"
    with pytest.raises(ValidationFailed, match="can't be chosen"):
        store.create_bank("bad", codec="zip")


@pytest.mark.parametrize("research", ["int4", "svd", "wf3", "mix3", "klt5"])
def test_a_new_bank_may_choose_only_the_four_codecs(make_store: Callable[..., BankStore], research: str) -> None:
    """auto, fp16, int8 and tklt5 are offered; a research preset is refused on create and update, storing nothing."""
    store = make_store()
    for codec in ("auto", "fp16", "int8", "tklt5"):
        assert store.create_bank(f"ok-{codec}", codec=codec).codec in {"fp16", "int8", "tklt5"}
    with pytest.raises(ValidationFailed, match="can't be chosen"):
        store.create_bank("research", codec=research)
    assert "research" not in {b.name for b in store.list_banks()}
    with pytest.raises(ValidationFailed, match="can't be chosen"):
        store.update_bank("ok-fp16", codec=research)
    assert store.get_bank("ok-fp16").codec == "fp16"


@pytest.mark.parametrize(("budget_bytes", "max_blocks"), [(2**63, None), (None, 2**31), (0, None), (None, -1)])
def test_bank_limits_past_the_catalog_range_are_refused_and_change_nothing(
        store: BankStore, budget_bytes: int | None, max_blocks: int | None) -> None:
    """A budget past 64 bits or a block cap past 32 bits used to reach the driver (an overflow, a 500)."""
    store.update_bank("kb", budget_bytes=1 << 30, max_blocks=8)
    with pytest.raises(ValidationFailed):
        store.update_bank("kb", codec="fp16", budget_bytes=budget_bytes, max_blocks=max_blocks)
    bank = store.get_bank("kb")
    assert (bank.codec, bank.budget_bytes, bank.max_blocks) == ("int8", 1 << 30, 8)
    with pytest.raises(ValidationFailed):
        store.create_bank("huge", budget_bytes=budget_bytes, max_blocks=max_blocks)
    assert "huge" not in {b.name for b in store.list_banks()}
