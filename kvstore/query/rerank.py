"""Second retrieval stage: reorder FAISS's top-N candidates before keeping the top k.

``embedding`` keeps FAISS's order. ``hybrid`` fuses the embedding score with BM25 over the candidates'
block texts: a sentence embedding blurs names and numbers, which are exactly what a lexical score
matches. ``kv`` fuses the embedding score with the KV-utility score (the attention the question's
queries pay each block's stored keys, :mod:`kvstore.query.keysummary`); ``hybrid_kv`` fuses all three.
The fusion is a min-max normalized weighted sum; its weights were chosen with
``bench/retrieval_quality.py`` (docs/research/retrieval.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from rank_bm25 import BM25Okapi

Retrieval = Literal["embedding", "kv", "hybrid", "hybrid_kv"]
RETRIEVAL_MODES: tuple[str, ...] = ("embedding", "kv", "hybrid", "hybrid_kv")
KV_MODES: tuple[str, ...] = ("kv", "hybrid_kv")  # the modes that need the KV-utility score
HYBRID_WEIGHT = 0.5  # share of the lexical score in the fused score
# Alone, the KV score ranks below the embedding (recall@1 0.62 vs 0.74); fused it adds what the embedding misses.
KV_WEIGHT = 0.5  # share of the KV score in kv's fused score; the rest is the embedding's
HYBRID_KV_WEIGHTS = (0.4, 0.4, 0.2)  # embedding, BM25 and KV shares in hybrid_kv

_WORD = re.compile(r"\w+")
# Question words and glue carry no evidence about which passage answers; BM25 would reward them anyway.
_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being do does did what which who "
    "whom whose when where why how that this these those it its as into than then there their they he she his her "
    "not no yes can could would should will shall may might must have has had".split())


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased word tokens without stopwords."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def bm25_scores(query: str, texts: Sequence[str]) -> np.ndarray:
    """BM25 (Okapi) of ``query`` against each of ``texts``; IDF is taken over these texts. Shape [len(texts)]."""
    # An empty document would make rank_bm25 divide by zero when every document is empty: pad with a non-word.
    corpus = [lexical_tokens(t) or ["\0"] for t in texts]
    return np.asarray(BM25Okapi(corpus).get_scores(lexical_tokens(query)), dtype=np.float64)


def minmax(x: np.ndarray) -> np.ndarray:
    # Candidates that all score alike (or a single one) are all at the top, not all at the bottom.
    span = float(x.max() - x.min()) if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.ones_like(x)


def fuse(embedding: np.ndarray, lexical: np.ndarray, weight: float = HYBRID_WEIGHT) -> np.ndarray:
    """Weighted sum of min-max normalized scores over the candidates; ``weight`` is the lexical share."""
    return (1.0 - weight) * minmax(np.asarray(embedding, dtype=np.float64)) + weight * minmax(lexical)


def hybrid_scores(query: str, texts: Sequence[str], embedding: np.ndarray,
                  weight: float = HYBRID_WEIGHT) -> np.ndarray:
    """Fused embedding + BM25 score of each candidate, shape [len(texts)]; higher is better."""
    if not len(texts):
        return np.zeros(0)
    return fuse(embedding, bm25_scores(query, texts), weight)


def rerank_scores(mode: str, query: str, texts: Sequence[str], embedding: np.ndarray,
                  kv: np.ndarray | None = None) -> np.ndarray:
    """Score of each candidate under a reranking ``mode`` (not ``embedding``), shape [len(texts)].

    ``kv`` is the KV-utility score of each candidate, required by ``kv`` and ``hybrid_kv``.
    """
    if not len(texts):
        return np.zeros(0)
    embedding = np.asarray(embedding, dtype=np.float64)
    if mode == "hybrid":
        return fuse(embedding, bm25_scores(query, texts))
    if kv is None:
        raise ValueError(f"retrieval {mode!r} needs the KV score")
    if mode == "kv":
        return (1.0 - KV_WEIGHT) * minmax(embedding) + KV_WEIGHT * minmax(np.asarray(kv, dtype=np.float64))
    w_emb, w_lex, w_kv = HYBRID_KV_WEIGHTS
    return (w_emb * minmax(embedding) + w_lex * minmax(bm25_scores(query, texts))
            + w_kv * minmax(np.asarray(kv, dtype=np.float64)))
