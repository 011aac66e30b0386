"""Decode new blocks into the hot tier at ingest, so a document's first query loads nothing (issue 33).

A query's first touch of a block otherwise reads its blob and decodes it (tens of ms for five ``tklt5``
blocks on the CPU) before the question's forward can start. Ingest already holds the encoded bytes and pays
a whole prefill per block, so decoding them there costs little and moves that work off the time to first
token. The *decoded* bytes are cached, not the freshly encoded KV: a lossy codec's blocks must be the same
on the first query as on every later one, after the hot tier has let them go.

Only room that is free is used: a new document does not push out blocks queries are using.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvstore.codec.format import decode_block
from kvstore.memory.hot import HotCache


def warm_new_blocks(hot: HotCache, bank: int, blobs: Iterable[tuple[str, bytes]], fingerprint: str,
                    device: torch.device | None = None) -> int:
    """Decode each ``(blob id, bytes)`` the bank does not hold hot yet into its part of ``hot`` while it fits in
    the free room (:meth:`HotCache.free_bytes`); how many were added."""
    added = 0
    for blob_id, data in blobs:
        if hot.contains(bank, blob_id):
            continue
        free = hot.free_bytes(bank)
        if free <= len(data):  # a decoded block is larger than its blob: no room for this one, nor likely the rest
            break
        kv = decode_block(data, fingerprint, device=device)
        if kv.nbytes > free:
            break
        hot.put(bank, blob_id, kv)
        added += 1
    return added
