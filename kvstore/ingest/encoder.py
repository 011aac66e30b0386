"""Turning a document's text into blocks: chunks, token ids, embeddings, KV, key summaries and blobs."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from kvstore.codec.format import encode_block
from kvstore.errors import ValidationFailed
from kvstore.ingest.chunking import chunk_text
from kvstore.model.loader import Embedder
from kvstore.model.runner import Runner
from kvstore.ports import SummaryBuilder
from kvstore.storage.blobstore import BlobStore
from kvstore.storage.catalog import BankRow


@dataclass(frozen=True)
class EncodedBlock:
    """One block of a document, its blob already written (content-addressed, so writing again is harmless)."""

    text: str
    token_ids: list[int]
    embedding: np.ndarray  # [dim] float32, unit norm
    blob_id: str
    summary: bytes  # the key summary (kvstore.query.keysummary)
    data: bytes  # the blob's bytes


class BlockEncoder:
    """Encodes blocks the way every later query expects them: each block's KV right after the prefix."""

    def __init__(self, runner: Runner, embedder: Embedder, model_lock: threading.Lock, blobs: BlobStore,
                 summaries: SummaryBuilder, batch_size: int) -> None:
        self.runner = runner
        self.embedder = embedder
        self.model_lock = model_lock
        self.blobs = blobs
        self.summaries = summaries
        self.batch_size = batch_size  # blocks per encode pass

    def encode(self, bank: BankRow, text: str) -> list[EncodedBlock]:
        """The document's blocks with the bank's block size and codec; blobs are written here."""
        runner = self.runner
        chunks = chunk_text(text, bank.block_tokens, lambda t: len(runner.tokenize(t)))
        if not chunks:
            raise ValidationFailed("document has no text to store")
        token_ids = [runner.tokenize(c) for c in chunks]
        vectors = self.embedder.embed(chunks)
        with self.model_lock:
            kvs = runner.encode(token_ids, self.batch_size)
        out = []
        for chunk, ids, vec, kv in zip(chunks, token_ids, vectors, kvs, strict=True):
            data = encode_block(kv, bank.model_fingerprint, bank.codec)
            out.append(EncodedBlock(chunk, ids, vec, self.blobs.put(data),
                                    self.summaries.build(kv, bank.model_fingerprint), data))
        return out
