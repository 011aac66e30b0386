"""Two-stage retrieval (issue 13): hybrid BM25 fusion, the ``retrieval`` option on search, query and the API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kvstore.bank import BankStore
from kvstore.errors import ValidationFailed
from kvstore.model.loader import Embedder, LoadedModel
from kvstore.query.rerank import bm25_scores, fuse, hybrid_scores, lexical_tokens
from tests.server_harness import live_server

# Near-identical sentences: the embedding barely tells them apart, the name does.
SHIPS = [
    "The ship Aurora sailed from the northern harbour in the spring of that year.",
    "The ship Borealis sailed from the northern harbour in the spring of that year.",
    "The ship Calypso sailed from the northern harbour in the spring of that year.",
]


def test_lexical_tokens_drop_stopwords_and_case() -> None:
    assert lexical_tokens("When did The Normans reach Italy?") == ["normans", "reach", "italy"]


def test_bm25_prefers_the_exact_name_and_survives_empty_texts() -> None:
    scores = bm25_scores("Which ship was Borealis?", SHIPS + [""])
    assert int(np.argmax(scores)) == 1
    assert bm25_scores("anything", ["", ""]).shape == (2,)


def test_fuse_is_a_weighted_sum_of_normalized_scores() -> None:
    fused = fuse(np.array([0.9, 0.8, 0.7]), np.array([0.0, 5.0, 10.0]), weight=0.5)
    np.testing.assert_allclose(fused, [0.5, 0.5, 0.5])
    # Tied scores (or a single candidate) count as the top of their scale, so a lone hit scores 1.0.
    np.testing.assert_allclose(fuse(np.array([0.9, 0.8]), np.array([3.0, 3.0]), weight=0.5), [1.0, 0.5])
    np.testing.assert_allclose(fuse(np.array([0.4]), np.array([0.0]), weight=0.5), [1.0])


def test_hybrid_ranks_the_exact_name_match_first() -> None:
    # The embedding slightly prefers the wrong ships; the lexical match on the name must win.
    texts = SHIPS + ["Photosynthesis converts light energy into chemical energy."]
    scores = hybrid_scores("Where did Calypso sail from?", texts, np.array([0.82, 0.81, 0.80, 0.30]))
    assert int(np.argmax(scores)) == 2
    assert hybrid_scores("q", [], np.zeros(0)).shape == (0,)


@pytest.fixture
def ships(make_store: Callable[..., BankStore]) -> BankStore:
    store = make_store()
    store.create_bank("ships")
    for i, text in enumerate(SHIPS):
        store.put_document("ships", f"s{i}", text)
    return store


def test_search_and_query_take_retrieval(ships: BankStore) -> None:
    hits = ships.search("ships", "Where did Calypso sail from?", k=3, retrieval="hybrid")
    assert hits[0].doc_id == "s2"
    assert len(ships.search("ships", "Where did Calypso sail from?", k=1, retrieval="hybrid")) == 1
    assert len(ships.search("ships", "Calypso", k=3, retrieval="embedding")) == 3
    result = ships.query("ships", "Where did Calypso sail from?", k=1, max_new_tokens=0, retrieval="hybrid")
    assert result.sources[0].doc_id == "s2"
    with pytest.raises(ValidationFailed):
        ships.search("ships", "Calypso", retrieval="telepathy")


def test_default_retrieval_comes_from_settings(make_store: Callable[..., BankStore]) -> None:
    store = make_store(rerank_candidates=3)
    assert store.settings.default_retrieval == "hybrid"
    store.create_bank("ships")
    for i, text in enumerate(SHIPS):
        store.put_document("ships", f"s{i}", text)
    assert store.search("ships", "Where did Borealis sail from?", k=1)[0].doc_id == "s1"


def test_api_accepts_retrieval(tmp_path: Path, tiny_llm: LoadedModel, embedder: Embedder) -> None:
    with live_server("sqlite", tmp_path, tiny_llm, embedder) as live, live.admin() as c:
        assert c.post("/v1/banks", json={"name": "ships"}).status_code in (200, 201)
        for i, text in enumerate(SHIPS):
            assert c.put(f"/v1/banks/ships/documents/s{i}", json={"text": text}).status_code in (200, 201)
        hits = c.post("/v1/banks/ships/search", json={"query": "Where did Calypso sail from?", "k": 3,
                                                        "retrieval": "hybrid"}).json()["hits"]
        assert hits[0]["doc_id"] == "s2"
        answer = c.post("/v1/banks/ships/query", json={"question": "Where did Calypso sail from?", "k": 1,
                                                         "max_new_tokens": 0, "retrieval": "hybrid"}).json()
        assert answer["sources"][0]["doc_id"] == "s2"
        bad = c.post("/v1/banks/ships/search", json={"query": "Calypso", "retrieval": "telepathy"})
        assert bad.status_code == 422
