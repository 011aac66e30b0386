"""KV rerank (issue 13): key summaries built, stored, verified and rebuilt with their block; the KV-utility
score on a constructed model; ``retrieval: "kv" | "hybrid_kv"`` through the engine and the HTTP API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, update

from kvstore.bank import BankStore
from kvstore.config import Settings
from kvstore.errors import CorruptBlock, ValidationFailed
from kvstore.model.loader import Embedder, LoadedModel, wrap_model
from kvstore.query.keysummary import decode_summary, encode_summary, kv_scores, plan_heads, question_queries, summarize
from kvstore.storage.catalog import BlockRow, DocumentRow
from kvstore.types import BlockKV
from tests.conftest import TINY_FAMILIES, build_tiny
from tests.server_harness import live_server

ANSWER = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
          "a region in France.")
UNRELATED = [
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
]
QUESTION = "Who gave their name to Normandy?"
LAYER0 = "0.0,0.1,0.2,0.3"  # every query head of the first layer of the tiny model


def tied_tiny(kind: str = "llama") -> LoadedModel:
    """A tiny model of ``kind`` with each query head's projection (bias, norm) tied to its kv head's key one.

    Random weights give attention with no meaning, so no score could be expected to prefer anything.
    Tied, a first-layer query of token t is ``Wk . norm(e_t)`` and the key of token s is ``Wk . norm(e_s)``:
    their dot product is largest when s is t, so the question's queries attend to the passage that shares
    its words, like the matching heads the rerank uses in a trained model.
    """
    llm = build_tiny(kind, **TINY_FAMILIES[kind])
    model = llm.model
    config = model.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for h in range(config.num_attention_heads):
                q_rows, k_rows = slice(h * dim, (h + 1) * dim), slice(h // group * dim, (h // group + 1) * dim)
                attn.q_proj.weight[q_rows] = attn.k_proj.weight[k_rows]
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[q_rows] = attn.k_proj.bias[k_rows]
            if getattr(attn, "q_norm", None) is not None:
                attn.q_norm.weight.copy_(attn.k_norm.weight)
    return wrap_model(model, llm.tokenizer, name=f"tiny-tied-{kind}")


@pytest.fixture(scope="module")
def tied() -> LoadedModel:
    return tied_tiny()


def _blocks(store: BankStore, bank: str) -> dict[str, BlockRow]:
    with store.session() as s:
        return {d.doc_id: b for b, d in s.execute(select(BlockRow, DocumentRow).join(
            DocumentRow, DocumentRow.id == BlockRow.document_id).where(BlockRow.ordinal == 0)).tuples()
            if b.bank_id == store.bank_row(s, bank).id}


def _stored(store: BankStore, block_id: int) -> bytes | None:
    with store.session() as s:
        return s.scalar(select(BlockRow.kv_summary).where(BlockRow.id == block_id))


def _same_keys(a: bytes | None, b: bytes | None) -> bool:
    """Two stored summaries hold the same keys, up to a couple of int8 steps (a rebuild reads the block's
    fp16 blob, ingest summarizes the fp32 KV before it is encoded)."""
    ka, kb = decode_summary(a or b"").keys, decode_summary(b or b"").keys
    return ka.shape == kb.shape and bool(torch.all((ka - kb).abs() <= 2 * kb.abs().amax(-1, keepdim=True) / 127))


# -- head plan and format -------------------------------------------------------------------------


def test_plan_maps_query_heads_to_their_kv_heads_and_falls_back() -> None:
    plan = plan_heads("1.3, 1.0, 7.1", num_layers=2, q_heads=4, kv_heads=2)
    assert plan.heads == ((1, 3), (1, 0))  # layer 7 does not exist: dropped
    assert plan.kv_pairs == ((1, 0), (1, 1))
    assert plan.pair_of_head == (1, 0)  # query head 3 reads kv head 1, query head 0 kv head 0
    fallback = plan_heads("17.3", num_layers=2, q_heads=4, kv_heads=2)
    assert fallback.heads == ((1, 0), (1, 1), (1, 2), (1, 3))
    with pytest.raises(ValidationFailed):
        plan_heads("seventeen", num_layers=2, q_heads=4, kv_heads=2)


def test_summary_round_trips_and_refuses_damage() -> None:
    k = torch.randn(2, 2, 7, 16)  # [layers, kv_heads, tokens, head_dim]
    plan = plan_heads("1.3,1.0", num_layers=2, q_heads=4, kv_heads=2)
    summary = summarize(BlockKV(k=k, v=torch.zeros_like(k)), plan, "fp")
    data = encode_summary(summary)
    back = decode_summary(data)
    assert back.fingerprint == "fp" and back.kv_pairs == plan.kv_pairs and back.tokens == 7
    # int8 with a per-key scale: half a step of rounding, plus the scale's own float16 rounding.
    step = k[1].abs().amax(-1, keepdim=True) / 127
    assert torch.all((back.keys - k[1]).abs() <= 0.6 * step)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(CorruptBlock, match="checksum"):
        decode_summary(bytes(flipped))
    with pytest.raises(CorruptBlock, match="magic"):
        decode_summary(b"XXXX" + data[4:])
    with pytest.raises(CorruptBlock, match="truncated"):
        decode_summary(data[:10])


# -- the question's queries ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY_FAMILIES))
def test_question_queries_are_pre_rope_and_mapped_to_their_kv_heads(make_store: Callable[..., BankStore],
                                                                   kind: str) -> None:
    """With tied query and key projections, a first-layer query of a token equals that token's first-layer
    key. The block's keys come from the ingest path (unrotated there), the queries from the capture
    (unrotated here, at other positions): they agree only if both are position-free and query head h is
    compared with kv head h // group. Gemma 3's first layer is a sliding layer with its own rotary base."""
    llm = tied_tiny(kind)
    store = make_store(llm=llm, kv_rerank_heads="0.0,0.1,0.2,0.3")
    runner = store.runner
    kv = runner.encode([runner.tokenize(QUESTION)])[0]  # k: [layers, kv_heads, tokens, dim], pre-RoPE
    queries = question_queries(runner, QUESTION, store.summaries.plan)  # [4 heads, tokens, dim]
    group = 4 // runner.kv_heads
    for h in range(4):
        torch.testing.assert_close(queries[h], kv.k[0, h // group].float(), atol=1e-4, rtol=1e-4)


# -- the score ------------------------------------------------------------------------------------


def test_block_with_the_answer_span_outscores_unrelated_blocks(make_store: Callable[..., BankStore],
                                                               tied: LoadedModel) -> None:
    store = make_store(llm=tied, kv_rerank_heads=LAYER0)
    runner = store.runner
    kvs = runner.encode([runner.tokenize(t) for t in [ANSWER, *UNRELATED]])
    summaries = [summarize(kv, store.summaries.plan, tied.fingerprint) for kv in kvs]
    queries = question_queries(runner, QUESTION, store.summaries.plan)
    assert queries.shape == (4, len(runner.tokenize(QUESTION)), 16)
    scores = kv_scores(queries, summaries, store.summaries.plan)
    assert scores[0] > scores[1] and scores[0] > scores[2]
    # The order of the candidates does not matter: the batch is scored as a set.
    again = kv_scores(queries, summaries[::-1], store.summaries.plan)
    assert again[2] > again[0] and again[2] > again[1]


def test_kv_retrieval_ranks_by_the_stored_summaries(make_store: Callable[..., BankStore], tied: LoadedModel) -> None:
    store = make_store(llm=tied, kv_rerank_heads=LAYER0)
    store.create_bank("b")
    for i, text in enumerate([ANSWER, *UNRELATED]):
        store.put_document("b", f"d{i}", text)
    blocks = _blocks(store, "b")
    with store.session() as s:
        bank = store.bank_row(s, "b")
        scores = store.summaries.scores(s, bank, QUESTION, [blocks["d0"], blocks["d1"], blocks["d2"]])
    assert scores[0] == max(scores)
    for mode in ("kv", "hybrid_kv"):
        hits = store.search("b", QUESTION, k=3, retrieval=mode)
        assert hits[0].doc_id == "d0" and len(hits) == 3
    assert store.integrity_report() == {}  # summaries written at ingest: nothing rebuilt


# -- stored, verified, rebuilt --------------------------------------------------------------------


def test_summaries_are_stored_with_the_block_and_rebuilt_with_it(make_store: Callable[..., BankStore],
                                                                   tied: LoadedModel) -> None:
    store = make_store(llm=tied, kv_rerank_heads=LAYER0)
    store.create_bank("b")
    store.put_document("b", "d", ANSWER)
    first = _blocks(store, "b")["d"]
    data = _stored(store, first.id)
    assert data is not None
    stored = decode_summary(data)
    kv = store.runner.encode([store.runner.tokenize(ANSWER)])[0]
    fresh = summarize(kv, store.summaries.plan, tied.fingerprint)
    assert stored.tokens == first.token_count and stored.fingerprint == tied.fingerprint
    torch.testing.assert_close(stored.keys, fresh.keys, atol=fresh.keys.abs().max().item() / 127, rtol=0)
    # A new version of the document: new blocks, each with the summary of its own new KV.
    store.put_document("b", "d", UNRELATED[0])
    second = _blocks(store, "b")["d"]
    redone = decode_summary(_stored(store, second.id) or b"")
    assert redone.tokens == second.token_count == len(store.runner.tokenize(UNRELATED[0])) != first.token_count
    new_kv = store.runner.encode([store.runner.tokenize(UNRELATED[0])])[0]
    assert _same_keys(_stored(store, second.id), encode_summary(summarize(new_kv, store.summaries.plan, "x")))


def test_a_damaged_summary_is_detected_and_rebuilt_never_used(make_store: Callable[..., BankStore],
                                                                tied: LoadedModel) -> None:
    store = make_store(llm=tied, kv_rerank_heads=LAYER0)
    store.create_bank("b")
    for i, text in enumerate([ANSWER, *UNRELATED]):
        store.put_document("b", f"d{i}", text)
    block = _blocks(store, "b")["d0"]
    good = _stored(store, block.id)
    assert good is not None
    # Damage the stored bytes so that, if they were used, the answer block would look like noise.
    bad = bytearray(good)
    bad[len(bad) // 3: len(bad) // 3 + 64] = bytes(64)
    with store.session() as s:
        s.execute(update(BlockRow).where(BlockRow.id == block.id).values(kv_summary=bytes(bad)))
        s.commit()
    with pytest.raises(CorruptBlock):
        decode_summary(bytes(bad))
    hits = store.search("b", QUESTION, k=3, retrieval="kv")
    assert hits[0].doc_id == "d0"
    report = store.integrity_report()["b"]
    assert report["corrupt_summaries"] == 1 and report["rebuilt_summaries"] == 1
    assert _same_keys(_stored(store, block.id), good)  # rebuilt from the block's KV: the keys of ingest


def test_missing_or_stale_summaries_are_rebuilt(make_store: Callable[..., BankStore], tied: LoadedModel) -> None:
    store = make_store(llm=tied, kv_rerank_heads=LAYER0)
    store.create_bank("b")
    store.put_document("b", "d0", ANSWER)
    store.put_document("b", "d1", UNRELATED[0])
    blocks = _blocks(store, "b")
    good = _stored(store, blocks["d0"].id)
    assert good is not None
    other_model = decode_summary(good)
    other_model.fingerprint = "another-model"
    with store.session() as s:
        # A block written before summaries existed, and one summarized by another model.
        s.execute(update(BlockRow).where(BlockRow.id == blocks["d0"].id).values(kv_summary=None))
        s.execute(update(BlockRow).where(BlockRow.id == blocks["d1"].id).values(
            kv_summary=encode_summary(other_model)))
        s.commit()
    store.search("b", QUESTION, k=2, retrieval="kv")
    assert _same_keys(_stored(store, blocks["d0"].id), good)
    assert decode_summary(_stored(store, blocks["d1"].id) or b"").fingerprint == tied.fingerprint
    assert store.integrity_report()["b"] == {"rebuilt_summaries": 2}


# -- API ------------------------------------------------------------------------------------------


def test_api_accepts_kv_retrieval(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder) as live, live.admin() as c:
        assert c.post("/v1/banks", json={"name": "b"}).status_code in (200, 201)
        for i, text in enumerate([ANSWER, *UNRELATED]):
            assert c.put(f"/v1/banks/b/documents/d{i}", json={"text": text}).status_code in (200, 201)
        for mode in ("kv", "hybrid_kv"):
            found = c.post("/v1/banks/b/search", json={"query": QUESTION, "k": 3, "retrieval": mode})
            assert found.status_code == 200, found.text
            assert sorted(h["doc_id"] for h in found.json()["hits"]) == ["d0", "d1", "d2"]
            answer = c.post("/v1/banks/b/query", json={"question": QUESTION, "k": 1, "max_new_tokens": 0,
                                                       "retrieval": mode})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["sources"]) == 1
        for body in ({"query": QUESTION, "retrieval": "KV"}, {"query": QUESTION, "retrieval": 1}):
            bad = c.post("/v1/banks/b/search", json=body)
            assert bad.status_code == 422, bad.text
        bad = c.post("/v1/banks/b/query", json={"question": QUESTION, "retrieval": "attention"})
        assert bad.status_code == 422


# -- the packaged model ---------------------------------------------------------------------------

NORMANS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.",
    "The Norman dynasty had a major political, cultural and military impact on medieval Europe. The Normans were "
    "famed for their martial spirit and eventually for their Catholic piety.",
    "Paris is the capital and most populous city of France. The Seine flows through it, and the city hosts the "
    "Louvre, the most visited art museum in the world.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
]


@pytest.mark.slow
def test_packaged_model_attends_most_to_the_block_holding_the_question(
        tmp_path: Path, smollm2: LoadedModel, embedder: Embedder) -> None:
    """Sanity check of the default heads on SmolLM2: a block that holds the question's own sentence gets the
    most attention among related and unrelated blocks."""
    store = BankStore(Settings(data_dir=tmp_path), llm=smollm2, embedder=embedder)
    store.create_bank("b")
    for i, text in enumerate(NORMANS):
        store.put_document("b", f"d{i}", text)
    blocks = _blocks(store, "b")
    rows = [blocks[f"d{i}"] for i in range(len(NORMANS))]
    with store.session() as s:
        bank = store.bank_row(s, "b")
        for i, question in ((0, "Who were the Norse raiders and pirates descended from?"),
                            (1, "What were the Normans famed for?"),
                            (2, "Which river flows through Paris?")):
            scores = store.summaries.scores(s, bank, question, rows)
            assert int(scores.argmax()) == i, (question, scores)
    store.close()
