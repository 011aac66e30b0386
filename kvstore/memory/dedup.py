"""Sharing stored KV between blocks, and repairing what near-duplicate merging did (issue 26, hole 4).

Two blocks may share one blob only when their token ids are identical: the same tokens after the same prefix
encode to the same KV, so sharing changes no answer, before or after any later write or delete. (Blobs are
content-addressed, so identical blocks written with the same codec already share one; dedup catches the rest,
e.g. one written before a codec change.)

The old maintenance merged *near*-duplicates (embedding cosine >= 0.95 and token-bigram overlap >= 0.7): it
pointed a block at another block's blob and copied that block's token ids, so a document answered with its
neighbour's facts in kv and text mode while its hit showed its own text. Migration 0010 flags every bank that
merged (``banks.merge_repair``); the next maintenance re-tokenizes each block of a flagged bank from its own
text and re-encodes every block whose stored tokens differ (:func:`misattributed`), then clears the flag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.storage.catalog import BlockRow


def ids_bytes(ids: Sequence[int]) -> bytes:
    """Token ids as the catalog stores them (int32 little-endian)."""
    return np.asarray(ids, dtype="<i4").tobytes()


def plan_dedup(blocks: Iterable[BlockRow]) -> list[tuple[BlockRow, BlockRow]]:
    """(canonical, duplicate) pairs of warm blocks with identical token ids but different blobs.

    The oldest block (lowest id) of each group of identical tokens is canonical; every other block of the group
    that holds a blob of its own is pointed at the canonical's.
    """
    canonical: dict[bytes, BlockRow] = {}
    pairs = []
    for block in sorted(blocks, key=lambda b: b.id):
        keep = canonical.setdefault(block.token_ids, block)
        if keep is not block and keep.blob_id != block.blob_id:
            pairs.append((keep, block))
    return pairs


def share_blob(canonical: BlockRow, duplicate: BlockRow) -> str | None:
    """Point ``duplicate`` at ``canonical``'s blob (their token ids are identical); returns the blob it freed."""
    if canonical.token_ids != duplicate.token_ids:
        raise ValueError("blocks share stored KV only when their token ids are identical")
    freed = duplicate.blob_id
    duplicate.blob_id, duplicate.stored_bytes = canonical.blob_id, canonical.stored_bytes
    duplicate.codec, duplicate.merged_into = canonical.codec, canonical.id
    duplicate.kv_summary = canonical.kv_summary  # the same keys, so the same summary
    return freed


@dataclass
class Misattributed:
    """A block whose stored token ids are not its own text's: the tokens it should have."""

    block: BlockRow
    token_ids: list[int]


def misattributed(blocks: Iterable[BlockRow], tokenize: Callable[[str], list[int]]) -> list[Misattributed]:
    """Blocks whose stored token ids differ from their own text's (what a near-duplicate merge left behind)."""
    out = []
    for block in blocks:
        ids = tokenize(block.text)
        if ids_bytes(ids) != block.token_ids:
            out.append(Misattributed(block, ids))
    return out
