"""Blocks with a valid checksum but hostile contents (issue 26, holes 10h and 10i).

The sha256 only proves the bytes were not damaged by accident: whoever can write the blob store can write a
block with a fresh checksum. Its header and payload must still be refused as a corrupt block (quarantined and
rebuilt from the document's tokens), never escape as a raw exception (a 500 with a traceback) and never make the
decoder allocate more than the header's declared shape allows (a zstd bomb).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import torch
import zstandard
from sqlalchemy import select

from kvstore.bank import BankStore
from kvstore.codec.format import FORMAT_VERSION, MAGIC, decode_block, encode_block, read_header
from kvstore.errors import CorruptBlock
from kvstore.storage.catalog import BlockRow
from kvstore.types import BlockKV

FP = "f" * 32
BOMB_BYTES = 256 << 20  # what the bomb frame claims and decodes to


def _block(tokens: int = 11) -> BlockKV:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, tokens, 16, generator=g).half()
    return BlockKV(k=k, v=torch.randn(3, 2, tokens, 16, generator=g).half())


def _wrap(raw: Any, payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    """A block from any header and payload, with a correct checksum."""
    head = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHI", MAGIC, version, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def _bomb() -> bytes:
    """A zstd frame of a few kilobytes that states and decodes to 256 MiB of zeros (built in 1 MiB pieces)."""
    comp = zstandard.ZstdCompressor(level=1).compressobj(size=BOMB_BYTES)
    chunk = b"\0" * (1 << 20)
    return b"".join(comp.compress(chunk) for _ in range(BOMB_BYTES >> 20)) + comp.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _bomb()


def _refused_within(data: bytes, limit_bytes: int) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(CorruptBlock):
            decode_block(data, FP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit_bytes, f"decoding a refused block allocated {peak} bytes"


def test_a_section_frame_that_decodes_past_its_declared_size_is_refused_unallocated(bomb: bytes) -> None:
    _, raw, payload = read_header(encode_block(_block(), FP, "fp16"))
    first = raw["sections"][0]["stored"]
    raw["sections"][0]["stored"] = len(bomb)
    _refused_within(_wrap(raw, bomb + payload[first:]), 16 << 20)


def test_a_version_1_single_frame_bomb_is_refused_unallocated(bomb: bytes) -> None:
    _, raw, _ = read_header(encode_block(_block(), FP, "fp16"))
    one = {**raw, "compression": "zstd",
           "sections": [{k: v for k, v in spec.items() if k != "stored"} for spec in raw["sections"]]}
    _refused_within(_wrap(one, bomb, version=1), 16 << 20)


def test_a_header_declaring_a_gigantic_shape_is_refused_before_decompressing() -> None:
    _, raw, payload = read_header(encode_block(_block(), FP, "fp16"))
    raw["tokens"] = 1 << 40
    for spec in raw["sections"]:
        spec["shape"][2] = 1 << 40
    _refused_within(_wrap(raw, payload), 1 << 20)


def _edit(name: str) -> Callable[[dict[str, Any]], Any]:
    def sections(fn: Callable[[list[dict[str, Any]]], None]) -> Callable[[dict[str, Any]], Any]:
        def apply(raw: dict[str, Any]) -> Any:
            fn(raw["sections"])
            return raw
        return apply

    edits: dict[str, Callable[[dict[str, Any]], Any]] = {
        "header is a list": lambda raw: [raw],
        "header is a number": lambda raw: 7,
        "layers is Infinity": lambda raw: {**raw, "layers": float("inf")},
        "tokens is NaN": lambda raw: {**raw, "tokens": float("nan")},
        "tokens is negative": lambda raw: {**raw, "tokens": -1},
        "tokens is a string": lambda raw: {**raw, "tokens": "eleven"},
        "params is a list": lambda raw: {**raw, "params": [1, 2]},
        "sections missing (v2)": lambda raw: {k: v for k, v in raw.items() if k != "sections"},
        "sections is an object": lambda raw: {**raw, "sections": {"k": 1}},
        "section is a string": sections(lambda secs: secs.__setitem__(0, "k")),
        "section shape is a number": sections(lambda secs: secs[0].__setitem__("shape", 5)),
        "section shape has a negative dim": sections(lambda secs: secs[0].__setitem__("shape", [3, 2, -1, 16])),
        "section shape has a float": sections(lambda secs: secs[0].__setitem__("shape", [3, 2, 11.5, 16])),
        "section stored is Infinity": sections(lambda secs: secs[0].__setitem__("stored", float("inf"))),
        "section dtype is a list": sections(lambda secs: secs[0].__setitem__("dtype", ["float16"])),
        "section name missing": sections(lambda secs: secs[0].pop("name")),
        "section shape smaller than the preset needs": sections(lambda secs: secs[0].__setitem__("shape", [1])),
    }
    return edits[name]


HEADER_EDITS = [
    "header is a list", "header is a number", "layers is Infinity", "tokens is NaN", "tokens is negative",
    "tokens is a string", "params is a list", "sections missing (v2)", "sections is an object", "section is a string",
    "section shape is a number", "section shape has a negative dim", "section shape has a float",
    "section stored is Infinity", "section dtype is a list", "section name missing",
    "section shape smaller than the preset needs",
]


@pytest.mark.parametrize("name", HEADER_EDITS)
def test_a_hostile_header_with_a_valid_checksum_is_a_corrupt_block(name: str) -> None:
    _, raw, payload = read_header(encode_block(_block(), FP, "fp16"))
    with pytest.raises(CorruptBlock):
        decode_block(_wrap(_edit(name)(raw), payload), FP)


def test_a_version_1_block_without_sections_is_a_corrupt_block() -> None:
    _, raw, payload = read_header(encode_block(_block(), FP, "fp16"))
    one = {k: v for k, v in raw.items() if k != "sections"} | {"compression": "zstd"}
    with pytest.raises(CorruptBlock):
        decode_block(_wrap(one, zstandard.ZstdCompressor().compress(b"\0" * 64), version=1), FP)


def test_a_hostile_block_in_a_bank_is_quarantined_and_rebuilt(make_store: Callable[..., BankStore]) -> None:
    """Through the store: the query that meets the block answers (rebuilt from the stored tokens) instead of
    failing with the decoder's exception, and the rebuilt block decodes again."""
    store = make_store()
    store.create_bank("kb")
    store.put_document("kb", "normans", "The Normans gave their name to Normandy, a region in France.")
    store.hot.budget_bytes = 0  # read from disk
    reference = store.query("kb", "Who were the Normans?", k=1, mode="text", max_new_tokens=4).answer
    with store.session() as s:
        blob_id = s.scalar(select(BlockRow.blob_id))
    assert blob_id
    path = store.blobs._path(blob_id)
    _, raw, payload = read_header(path.read_bytes())
    raw["sections"][0]["shape"] = 5  # an int where a list belongs: a TypeError in the old parser
    path.write_bytes(_wrap(raw, payload))
    assert store.query("kb", "Who were the Normans?", k=1, max_new_tokens=4).answer == reference
    assert store.integrity_report()["kb"]["rebuilt_blocks"] == 1
    assert store.verify("kb") == {"checked": 1, "rebuilt": 0}
