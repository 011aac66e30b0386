"""The block format: fp16 round-trips bit-exactly; corruption and foreign KV are refused."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
import zstandard

from kvstore.codec.format import FORMAT_VERSION, MAGIC, PRESETS, decode_block, encode_block, payload_bytes, read_header
from kvstore.errors import CorruptBlock, IncompatibleModel, ValidationFailed
from kvstore.types import BlockKV

FP = "f" * 32


def _block(tokens: int = 11) -> BlockKV:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, tokens, 16, generator=g).to(torch.float16)
    v = torch.randn(3, 2, tokens, 16, generator=g).to(torch.float16)
    return BlockKV(k=k, v=v)


def test_fp16_round_trip_is_bit_exact() -> None:
    block = _block()
    out = decode_block(encode_block(block, FP, "fp16"), FP)
    assert out.k.dtype == torch.float16 and torch.equal(out.k, block.k) and torch.equal(out.v, block.v)


def test_header_describes_the_block() -> None:
    header, raw, _ = read_header(encode_block(_block(7), FP, "fp16"))
    assert header.shape == (3, 2, 7, 16) and header.codec == "fp16" and header.key_convention == "pre_rope"
    assert header.fingerprint == FP and [s["name"] for s in raw["sections"]] == ["k", "v"]


@pytest.mark.parametrize("position", [0, 5, 40, -40, -1])
def test_a_flipped_byte_anywhere_is_refused(position: int) -> None:
    data = bytearray(encode_block(_block(), FP, "fp16"))
    data[position] ^= 0x01
    with pytest.raises(CorruptBlock):
        decode_block(bytes(data), FP)


@pytest.mark.parametrize("keep", [0, 3, 10, 100, -1])
def test_a_truncated_block_is_refused(keep: int) -> None:
    data = encode_block(_block(), FP, "fp16")
    with pytest.raises(CorruptBlock):
        decode_block(data[:keep] if keep >= 0 else data[:keep], FP)


def test_a_block_of_another_model_is_refused() -> None:
    data = encode_block(_block(), FP, "fp16")
    with pytest.raises(IncompatibleModel):
        decode_block(data, "0" * 32)


def test_pickle_bytes_are_not_a_block() -> None:
    import pickle

    with pytest.raises(CorruptBlock):
        decode_block(pickle.dumps({"k": [1, 2, 3]}), FP)


def test_unknown_codec_is_a_validation_error() -> None:
    with pytest.raises(ValidationFailed):
        encode_block(_block(), FP, "no-such-codec")


def test_out_of_memory_while_decoding_is_not_called_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_block(_block(), FP, "fp16")

    def exhausted(*_: object) -> BlockKV:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(PRESETS["fp16"], "decode", exhausted)
    with pytest.raises(torch.OutOfMemoryError):
        decode_block(data, FP)


def _rewrap(raw: dict, payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    """A block from a raw header and payload, with a fresh checksum (so only the layout checks can refuse it)."""
    head = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHI", MAGIC, version, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def test_each_section_is_its_own_zstd_frame() -> None:
    data = encode_block(_block(), FP, "int4")
    _, raw, payload = read_header(data)
    assert raw["compression"] == "zstd-sections"
    assert sum(spec["stored"] for spec in raw["sections"]) == len(payload)


def test_a_version_1_block_with_one_frame_still_decodes() -> None:
    """Blocks written before per-section frames hold every section in one zstd frame."""
    data = encode_block(_block(), FP, "int4")
    _, raw, payload = read_header(data)
    one = {**raw, "compression": "zstd",
           "sections": [{k: v for k, v in spec.items() if k != "stored"} for spec in raw["sections"]]}
    older = _rewrap(one, zstandard.ZstdCompressor().compress(payload_bytes(raw, payload)), version=1)
    old, new = decode_block(older, FP), decode_block(data, FP)
    assert torch.equal(old.k, new.k) and torch.equal(old.v, new.v)


@pytest.mark.parametrize("edit", ["stored_short", "stored_long", "stored_missing", "compression", "version"])
def test_a_payload_that_disagrees_with_its_header_is_refused(edit: str) -> None:
    _, raw, payload = read_header(encode_block(_block(), FP, "int4"))
    version = FORMAT_VERSION
    if edit == "stored_short":
        raw["sections"][0]["stored"] -= 1
    elif edit == "stored_long":
        raw["sections"][-1]["stored"] += 5
    elif edit == "stored_missing":
        del raw["sections"][1]["stored"]
    elif edit == "compression":
        raw["compression"] = "lz4"
    else:
        version = FORMAT_VERSION + 1
    with pytest.raises(CorruptBlock):
        decode_block(_rewrap(raw, payload, version), FP)
