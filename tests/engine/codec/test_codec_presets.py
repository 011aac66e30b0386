"""Lossy codec presets: stated error bounds on random and real-ish KV, integrity, mixed-preset banks."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from sqlalchemy import select

from kvstore.bank import BankStore
from kvstore.codec import tiered, waterfill
from kvstore.codec.calibration import CodecWeights, codec_weights, query_spread_from_json
from kvstore.codec.format import FORMAT_VERSION, MAGIC, PRESETS, decode_block, encode_block, payload_bytes, read_header
from kvstore.codec.quant import dequantize, pack_bits, quantize, unpack_bits, water_fill
from kvstore.codec.tiered import TIER_BITS, tier_sizes, token_importance
from kvstore.errors import CorruptBlock, ValidationFailed
from kvstore.model.runner import Runner
from kvstore.storage.catalog import BlockRow
from kvstore.types import BlockKV
from tests.conftest import build_tiny

FP = "f" * 32
LOSSY = sorted(n for n in PRESETS if n != "fp16")

# Stated bound per preset: relative RMS error of K and V, ||x - x'|| / ||x||, on Gaussian-like KV.
# Min-max quantization of a group spanning ~5 sigma at b bits has relative RMS ~ 5 / ((2^b - 1) * sqrt(12)).
REL_RMS_BOUND: dict[str, tuple[float, float]] = {
    "int8": (0.01, 0.01),
    "int4": (0.12, 0.12),
    "k4v3": (0.12, 0.25),
    "k3v3": (0.25, 0.25),
    "k2v2": (0.50, 0.50),
    "svd": (0.20, 0.12),
    "svd-layer": (0.40, 0.12),
    "rot6": (0.03, 0.04),
    "rot5": (0.06, 0.08),
    "rot4": (0.12, 0.15),
    "mix3": (0.25, 0.50),
    "mix2": (0.50, 0.50),
    # Water-filled: a mean width, but a key channel may get as few as 0 bits and a value head 2.
    "wf45": (0.10, 0.20),
    "wf31": (0.20, 0.40),
    "wf3": (0.20, 0.40),
    "wf27": (0.25, 0.50),
    "wf2": (0.35, 0.60),
    # Tiered: the best-scored tokens at wf45's widths, the rest at wf3's, wf27's or 2.5 bits.
    "tier45": (0.20, 0.40),
    "tier5": (0.25, 0.50),
    "tier55": (0.30, 0.55),
    # Keys in the calibrated basis: its widths follow the Fisher metric, not the keys' own error, so raw key
    # error runs higher than wf's at the same bits (without a calibration the keys are wf's channels).
    "klt5": (0.30, 0.40),
    "tklt5": (0.30, 0.50),
}


def _one_frame(raw: dict, flat: bytes, version: int = FORMAT_VERSION) -> bytes:
    """A block from a header and its sections' raw bytes, as one zstd frame (``zstd``), with a fresh checksum:
    how tests write what only the decoder's own checks can catch."""
    raw = {**raw, "compression": "zstd", "sections": [{k: v for k, v in spec.items() if k != "stored"}
                                                      for spec in raw["sections"]]}
    head = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHI", MAGIC, version, len(head)) + head + zstandard.ZstdCompressor().compress(flat)
    return body + hashlib.sha256(body).digest()


def _flat(data: bytes) -> tuple[dict, bytes]:
    """A block's raw header and its sections' raw bytes."""
    _, raw, payload = read_header(data)
    return raw, payload_bytes(raw, payload)


def _random_block(tokens: int = 37, dim: int = 16, seed: int = 1) -> BlockKV:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(3, 2, tokens, dim, generator=g)
    k[..., 3] += 8.0  # a fixed outlier channel, as pre-RoPE keys have
    v = torch.randn(3, 2, tokens, dim, generator=g)
    return BlockKV(k=k, v=v)


def _rel_rms(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).norm() / x.float().norm())


def _check_bounds(name: str, block: BlockKV) -> None:
    out = decode_block(encode_block(block, FP, name), FP)
    assert out.k.shape == block.k.shape and out.v.shape == block.v.shape
    k_bound, v_bound = REL_RMS_BOUND[name]
    assert _rel_rms(block.k, out.k) <= k_bound, name
    assert _rel_rms(block.v, out.v) <= v_bound, name


def test_every_lossy_preset_states_a_bound() -> None:
    assert set(LOSSY) == set(REL_RMS_BOUND)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_round_trip_within_bound_on_random_kv(name: str, tokens: int) -> None:
    _check_bounds(name, _random_block(tokens=tokens))


@pytest.fixture(scope="module")
def real_kv() -> BlockKV:
    """KV of a sentence from the tiny model, head_dim 32 (a power of two: Hadamard applies)."""
    runner = Runner(build_tiny("llama", hidden_size=128, num_attention_heads=4), "You are a helpful assistant.")
    ids = runner.tokenize("The Normans were the people who gave their name to Normandy, a region in France. " * 3)
    return runner.encode([ids])[0]


@pytest.mark.parametrize("name", LOSSY)
def test_round_trip_within_bound_on_model_kv(name: str, real_kv: BlockKV) -> None:
    _check_bounds(name, real_kv)


def test_quantize_error_is_at_most_half_a_step() -> None:
    x = torch.randn(5, 7, 64) * torch.logspace(-3, 3, 7)[:, None]
    for bits in (2, 3, 4, 8):
        codes, scale, low = quantize(x, bits)
        err = (dequantize(codes, scale, low) - x).abs()
        # fp16 scale/low rounding adds at most a few ulps of the group's magnitude.
        slack = 2e-3 * x.abs().amax(-1, keepdim=True)
        assert bool((err <= scale.float() / 2 + slack).all()), bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_bit_packing_round_trips(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)
    aligned = pack_bits(codes, bits, aligned=True)
    assert aligned.numel() == -(-1001 // (8 // bits))
    assert torch.equal(unpack_bits(aligned, bits, 1001, aligned=True), codes)
    if 8 % bits == 0:
        assert torch.equal(aligned, packed)


@pytest.mark.parametrize("name", ["int4", "k3v3", "rot5", "wf3", "tklt5"])
def test_codes_that_straddle_bytes_are_stored_byte_aligned(name: str) -> None:
    """Widths that do not divide 8 go whole per byte (``_bytes``), so zstd codes their skewed levels."""
    data = encode_block(_smollm_shaped_block(), FP, name)
    names = {s["name"] for s in read_header(data)[1]["sections"]}
    for section in names:
        width = section.removesuffix("_codes").removesuffix("_bytes")[-1:]
        if section.endswith(("_codes", "_bytes")) and width.isdigit() and width != "0":
            assert section.endswith("_bytes") == (8 % int(width) != 0), section


def test_blocks_with_tightly_packed_odd_widths_still_decode() -> None:
    """Blocks written before byte-aligned codes hold every width tightly packed in ``_codes``."""
    block = _smollm_shaped_block(tokens=60)
    data = encode_block(block, FP, "wf3")
    raw, flat = _flat(data)
    parts, offset, rewritten = [], 0, 0
    for spec in raw["sections"]:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        count = int(np.prod(spec["shape"]))
        part = np.frombuffer(flat, dtype=dtype, count=count, offset=offset)
        offset += count * dtype.itemsize
        if spec["name"].endswith("_bytes"):
            bits = int(spec["name"].removesuffix("_bytes")[1:])
            scale = np.prod(next(s["shape"] for s in raw["sections"] if s["name"] == f"{spec['name'][:-6]}_scale"))
            codes = unpack_bits(torch.from_numpy(part.copy()), bits, count * (8 // bits), aligned=True)
            codes = codes[:int(scale) * raw["params"]["k_group" if spec["name"][0] == "k" else "v_group"]]
            part = pack_bits(codes, bits).numpy()
            spec["name"] = spec["name"].replace("_bytes", "_codes")
            spec["shape"] = list(part.shape)
            rewritten += 1
        parts.append(part.tobytes())
    assert rewritten
    older = decode_block(_one_frame(raw, b"".join(parts), version=1), FP)
    new = decode_block(data, FP)
    assert torch.equal(older.k, new.k) and torch.equal(older.v, new.v)


@pytest.mark.parametrize("name", LOSSY)
def test_params_describe_the_block(name: str) -> None:
    header, raw, _ = read_header(encode_block(_random_block(), FP, name))
    assert header.codec == name and header.params
    assert all(s["dtype"] in {"uint8", "float16", "int16"} for s in raw["sections"])
    assert any(s["dtype"] == "uint8" for s in raw["sections"])


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("position", [0, 5, 40, 200, -40, -1])
def test_a_flipped_byte_is_refused(name: str, position: int) -> None:
    data = bytearray(encode_block(_random_block(), FP, name))
    data[position] ^= 0x01
    with pytest.raises(CorruptBlock):
        decode_block(bytes(data), FP)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("keep", [0, 10, 100, -1, -33])
def test_a_truncated_block_is_refused(name: str, keep: int) -> None:
    data = encode_block(_random_block(), FP, name)
    with pytest.raises(CorruptBlock):
        decode_block(data[:keep], FP)


@pytest.mark.parametrize("first", ["mix3", "wf3", "tier5"])
def test_blocks_keep_their_preset_after_the_bank_default_changes(make_store: Callable[..., BankStore],
                                                                 first: str) -> None:
    store = make_store()
    store.create_bank("mixed", codec="fp16")
    with store.sessions() as s, s.begin():  # a bank an earlier release created with a research preset
        store.bank_row(s, "mixed").codec = first
    store.put_document("mixed", "a", "The Normans gave their name to Normandy, a region in France.")
    store.update_bank("mixed", codec="fp16")
    store.put_document("mixed", "b", "Paris is the capital and most populous city of France.")
    with pytest.raises(ValidationFailed, match="can't be chosen"):
        store.update_bank("mixed", codec="svd")
    with store.sessions() as s:
        bank = store.bank_row(s, "mixed")
        rows = s.scalars(select(BlockRow).where(BlockRow.bank_id == bank.id).order_by(BlockRow.id)).all()
        assert [r.codec for r in rows] == [first, "fp16"]
        for row in rows:
            store.hot.discard(bank.id, row.blob_id)
            header, _, _ = read_header(store.blobs.get(row.blob_id))
            assert header.codec == row.codec
            kv = store.load_block(s, bank, row)
            assert kv.tokens == row.token_count
    result = store.query("mixed", "Which region is named after the Normans?", k=2, max_new_tokens=3)
    assert len(result.sources) == 2


def _deep_block(layers: int = 30, tokens: int = 41, dim: int = 16, seed: int = 2) -> BlockKV:
    """A block with as many layers as SmolLM2, so the per-layer widths of ``mix3``/``mix2`` apply."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, 2, tokens, dim, generator=g)
    k[..., 5] += 6.0
    return BlockKV(k=k, v=torch.randn(layers, 2, tokens, dim, generator=g))


@pytest.mark.parametrize("name", ["mix3", "mix2"])
def test_per_layer_widths_are_in_the_header_and_decode(name: str) -> None:
    block = _deep_block()
    data = encode_block(block, FP, name)
    header, raw, _ = read_header(data)
    k_bits, v_bits = header.params["k_bits"], header.params["v_bits"]
    assert isinstance(k_bits, list) and len(k_bits) == 30 and isinstance(v_bits, list) and len(v_bits) == 30
    assert k_bits[18] > k_bits[0] and v_bits[18] > v_bits[13]
    assert header.params["k_rotate"] == header.params["v_rotate"] == "hadamard" and header.params["v_symmetric"]
    # One section group per width, every layer in exactly one.
    assert {s["name"] for s in raw["sections"]} >= {f"k{w}_scale" for w in set(k_bits)} | {f"v{w}_scale" for w in
                                                                                           set(v_bits)}
    out = decode_block(data, FP)
    k_err = (out.k.float() - block.k).pow(2).mean(dim=(1, 2, 3)).sqrt()  # [layers]
    # More bits, less error: the boosted key layer beats every layer at the base width.
    base = [layer for layer, b in enumerate(k_bits) if b == min(k_bits)]
    assert float(k_err[18]) < float(k_err[base].min())
    _check_bounds(name, block)


def test_water_fill_meets_the_budget_and_follows_the_cost() -> None:
    cost = torch.logspace(-8, 2, 500)[torch.randperm(500)]
    for mean in (0.5, 2.0, 3.0, 3.15, 6.0):
        widths = water_fill(cost, mean)
        assert float(widths.mean()) <= mean and float(widths.mean()) > mean - 0.1
        assert not bool((widths == 1).any()) and int(widths.max()) <= 8
        order = cost.argsort()
        assert bool((widths[order].diff() >= 0).all())  # a costlier item never gets fewer bits
    assert bool((water_fill(cost, 2.5, floor=2) >= 2).all())
    assert torch.equal(water_fill(torch.zeros(7), 3.0), torch.zeros(7))


def _smollm_shaped_block(tokens: int = 150) -> BlockKV:
    """A block shaped like SmolLM2's (30 layers, 3 KV heads, head_dim 64): the shipped calibration applies."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(30, 3, tokens, 64, generator=g) + torch.linspace(-4, 4, 64)
    return BlockKV(k=k, v=torch.randn(30, 3, tokens, 64, generator=g))


@pytest.mark.parametrize("name", ["wf45", "wf31", "wf3", "wf27"])
def test_water_filled_widths_are_sections_and_follow_the_calibration(name: str) -> None:
    weights = codec_weights(30, 3, 64)
    assert weights is not None
    block = _smollm_shaped_block()
    data = encode_block(block, FP, name)
    header, raw, _ = read_header(data)
    sections = {s["name"]: s for s in raw["sections"]}
    assert sections["k_widths"]["shape"] == [30, 3, 64] and sections["v_widths"]["shape"] == [30, 3]
    out = decode_block(data, FP)
    k_widths = torch.from_numpy(_section(data, "k_widths")).float()
    v_widths = torch.from_numpy(_section(data, "v_widths")).float()
    assert float(k_widths.mean()) <= header.params["k_mean_bits"]
    assert float(v_widths.mean()) <= header.params["v_mean_bits"] and float(v_widths.min()) >= 2
    # The most sensitive value head (calibrated) gets more than the least; key channels too.
    assert v_widths.view(-1)[weights.values.argmax()] > v_widths.view(-1)[weights.values.argmin()]
    cost = weights.keys.view(-1)
    assert k_widths.view(-1)[cost.argmax()] > k_widths.view(-1)[cost.argmin()]
    # More bits, less error, per key channel.
    k_err = (out.k.float() - block.k).pow(2).mean(2).view(-1)  # [L*H*D]
    wide, narrow = k_widths.view(-1) >= 6, k_widths.view(-1) == 2
    assert float(k_err[wide].mean()) < float(k_err[narrow].mean())
    _check_bounds(name, block)


def _section(data: bytes, name: str) -> np.ndarray:
    """One section of a block, read back through the header's layout."""
    raw, flat = _flat(data)
    offset = 0
    for spec in raw["sections"]:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        count = int(np.prod(spec["shape"]))
        if spec["name"] == name:
            return np.frombuffer(flat, dtype=dtype, count=count, offset=offset).reshape(spec["shape"]).copy()
        offset += count * dtype.itemsize
    raise KeyError(name)


def test_water_filled_widths_that_disagree_with_the_sections_are_refused() -> None:
    data = encode_block(_random_block(), FP, "wf3")
    raw, payload = _flat(data)
    flat = bytearray(payload)
    assert raw["sections"][0]["name"] == "k_widths"
    flat[0] = 7 if flat[0] != 7 else 5  # one channel claims another width than its codes were stored at
    with pytest.raises(CorruptBlock):
        decode_block(_one_frame(raw, bytes(flat)), FP)


GOLDEN = Path(__file__).resolve().parents[2] / "data" / "codec_v1"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.kvrb")))
def test_blocks_written_by_the_first_codec_release_still_decode(name: str) -> None:
    """Blocks encoded by the codec as first committed (before rotated keys, per-layer widths and word
    packing) decode to what that code decoded them to."""
    out = decode_block((GOLDEN / f"{name}.kvrb").read_bytes(), FP)
    expected = np.frombuffer((GOLDEN / f"{name}.decoded.f16").read_bytes(), dtype="<f2").astype(np.float32)
    got = np.concatenate([out.k.to(torch.float16).numpy().ravel(), out.v.to(torch.float16).numpy().ravel()])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_params_missing_from_older_blocks_take_their_old_meaning() -> None:
    # Blocks written before key rotation existed have no ``k_rotate``: they were not rotated.
    data = encode_block(_random_block(), FP, "int4")
    header, raw, payload = read_header(data)
    assert raw["params"].pop("k_rotate") == "none"
    head = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHI", MAGIC, FORMAT_VERSION, len(head)) + head + payload
    older = body + hashlib.sha256(body).digest()
    same = decode_block(older, FP)
    new = decode_block(data, FP)
    assert torch.equal(same.k, new.k) and torch.equal(same.v, new.v)


def _tiers(data: bytes) -> torch.Tensor:
    """``[L, H, T]``: the tier of every token, read back from the block's ``tier`` section."""
    header, _, _ = read_header(data)
    layers, heads, tokens, _ = header.shape
    packed = torch.from_numpy(_section(data, "tier"))
    return unpack_bits(packed, TIER_BITS, layers * heads * tokens).view(layers, heads, tokens).long()


def _rewritten(data: bytes, name: str, edit: Callable[[np.ndarray], None]) -> bytes:
    """The block with one section edited and a fresh checksum: what only the decoder's checks can catch."""
    raw, payload = _flat(data)
    flat = bytearray(payload)
    offset = 0
    for spec in raw["sections"]:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        size = int(np.prod(spec["shape"])) * dtype.itemsize
        if spec["name"] == name:
            part = np.frombuffer(bytes(flat[offset:offset + size]), dtype=dtype).copy()
            edit(part)
            flat[offset:offset + size] = part.tobytes()
        offset += size
    return _one_frame(raw, bytes(flat))


def test_tiers_follow_the_calibrated_importance() -> None:
    weights = codec_weights(30, 3, 64)
    assert weights is not None and weights.queries is not None and weights.queries.shape == (30, 9, 64)
    block = _smollm_shaped_block()
    data = encode_block(block, FP, "tier5")
    header, _, _ = read_header(data)
    sizes = [t["tokens"] for t in header.params["tiers"]]
    assert sizes == tier_sizes(150, [0.2, 1.0]) == [30, 120]
    assert header.params["importance"] == "query_spread"
    assert [t["k_mean_bits"] for t in header.params["tiers"]] == [4.5, 2.7]
    tier = _tiers(data)
    for i, size in enumerate(sizes):
        assert bool(((tier == i).sum(-1) == size).all())  # every (layer, head) the same split
    # Tier 0 holds each head's best-scored tokens, and they are stored at more bits.
    score = token_importance(block.k, weights.queries, weights.query_spread)  # [L, H, T]
    top = score.topk(30, dim=-1).indices
    assert bool((tier.gather(-1, top) == 0).all())
    out = decode_block(data, FP)
    for side, x in (("k", block.k), ("v", block.v)):
        err = (getattr(out, side).float() - x).pow(2).mean(-1)  # [L, H, T]
        assert float(err[tier == 0].mean()) < float(err[tier == 1].mean()) / 2, side
    _check_bounds("tier5", block)


def test_tiered_blocks_decode_without_the_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    block = _smollm_shaped_block(tokens=70)
    data = encode_block(block, FP, "tier5")

    def unavailable(*_args: object) -> None:
        raise AssertionError("decode read the calibration")

    for module in (tiered, waterfill):  # every place the presets look the calibration up
        monkeypatch.setattr(module, "codec_weights", unavailable)
    out = decode_block(data, FP)
    assert _rel_rms(block.k, out.k) <= REL_RMS_BOUND["tier5"][0]


def test_a_model_without_calibration_ranks_tokens_by_key_norm() -> None:
    block = _random_block(tokens=100)
    data = encode_block(block, FP, "tier5")
    header, _, _ = read_header(data)
    assert header.params["importance"] == "key_norm"
    tier = _tiers(data)
    norm = block.k.norm(dim=-1)
    assert bool((tier.gather(-1, norm.topk(2, dim=-1).indices) == 0).all())


@pytest.mark.parametrize("edit", ["move_a_token", "tier_out_of_range"])
def test_tampered_tiers_are_refused(edit: str) -> None:
    data = encode_block(_smollm_shaped_block(tokens=70), FP, "tier5")

    def change(codes: np.ndarray) -> None:
        # Byte 0 holds tokens 0-3 of (layer 0, head 0): moving one token to another tier breaks the split.
        codes[0] = codes[0] ^ 0x01 if edit == "move_a_token" else codes[0] | 0x03

    with pytest.raises(CorruptBlock):
        decode_block(_rewritten(data, "tier", change), FP)
    header, raw, payload = read_header(data)
    raw["params"]["tiers"][0]["tokens"] += 1  # sizes that no longer add up to the block
    head = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHI", MAGIC, FORMAT_VERSION, len(head)) + head + payload
    with pytest.raises(CorruptBlock):
        decode_block(body + hashlib.sha256(body).digest(), FP)


def _rewritten_params(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """The block with its header params edited and a fresh checksum."""
    _, raw, payload = read_header(data)
    edit(raw["params"])
    head = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    body = struct.pack("<4sHI", MAGIC, FORMAT_VERSION, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("name", ["klt5", "tklt5"])
def test_key_basis_blocks_name_the_shipped_basis(name: str) -> None:
    weights = codec_weights(30, 3, 64)
    assert weights is not None and weights.key_basis is not None
    basis = weights.key_basis
    assert basis.forward.shape == (30, 3, 64, 64) and basis.weight.shape == (30, 3)
    assert torch.allclose(basis.forward @ basis.inverse, torch.eye(64).expand(30, 3, 64, 64), atol=1e-3)
    block = _smollm_shaped_block()
    header, _, _ = read_header(encode_block(block, FP, name))
    specs = header.params["tiers"] if name == "tklt5" else [header.params]
    assert all(spec["k_basis"] == basis.digest for spec in specs)
    _check_bounds(name, block)


def test_key_basis_coefficients_are_coded_not_channels() -> None:
    """The widths section belongs to the basis' coefficients: the error of each is within its width's step."""
    basis = codec_weights(30, 3, 64).key_basis  # type: ignore[union-attr]
    assert basis is not None
    block = _smollm_shaped_block()
    data = encode_block(block, FP, "klt5")
    out = decode_block(data, FP)
    widths = torch.from_numpy(_section(data, "k_widths")).long()  # [L, H, D] per coefficient
    x, x_out = block.k @ basis.forward, out.k.float() @ basis.forward  # [L, H, T, D] coefficients
    spread = x.amax(2) - x.amin(2)  # [L, H, D]
    err = (x_out - x).abs().amax(2)
    coded = widths > 0
    step = spread / (2.0 ** widths - 1).clamp_min(1)
    # Half a step plus fp16 rounding of the decoded keys, seen through the basis.
    assert bool((err[coded] <= step[coded] / 2 + 0.05 * spread[coded] + 0.05).all())


def test_a_block_in_a_basis_this_install_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_block(_smollm_shaped_block(tokens=70), FP, "klt5")

    def other(params: dict) -> None:
        params["k_basis"] = "0" * 16  # another calibration's basis

    with pytest.raises(CorruptBlock, match="basis"):
        decode_block(_rewritten_params(data, other), FP)
    weights = codec_weights(30, 3, 64)
    assert weights is not None
    without = CodecWeights(keys=weights.keys, values=weights.values, queries=weights.queries)
    monkeypatch.setattr(waterfill, "codec_weights", lambda *_args: without)
    with pytest.raises(CorruptBlock, match="basis"):
        decode_block(data, FP)
    monkeypatch.setattr(waterfill, "codec_weights", lambda *_args: None)
    with pytest.raises(CorruptBlock, match="basis"):
        decode_block(data, FP)


def test_a_model_without_a_key_basis_codes_plain_channels() -> None:
    data = encode_block(_random_block(), FP, "klt5")
    header, _, _ = read_header(data)
    assert "k_basis" not in header.params
    out = decode_block(data, FP)
    assert _rel_rms(_random_block().k, out.k) <= REL_RMS_BOUND["klt5"][0]


def test_a_tampered_key_basis_block_is_refused() -> None:
    data = encode_block(_smollm_shaped_block(tokens=70), FP, "klt5")

    def change(codes: np.ndarray) -> None:
        codes[0] = 9  # a coefficient width out of range

    with pytest.raises(CorruptBlock):
        decode_block(_rewritten(data, "k_widths", change), FP)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(CorruptBlock):
        decode_block(bytes(flipped), FP)


def test_the_query_spread_raises_keys_along_directions_questions_vary_in() -> None:
    dim = 8
    queries = torch.zeros(1, 1, dim)
    queries[0, 0, 0] = 1.0  # the mean question looks along channel 0
    k = torch.zeros(1, 1, 3, dim)
    k[0, 0, 0, 0] = 2.0  # what the mean question attends to
    k[0, 0, 1, 1] = 2.0  # orthogonal to it, along the direction questions vary in
    k[0, 0, 2, 2] = 2.0  # orthogonal, along a direction no question takes
    spread = torch.zeros(1, 1, dim, dim)
    assert torch.equal(token_importance(k, queries, spread), token_importance(k, queries))
    spread[0, 0, 1, 1] = 3.0
    plain, spread_score = token_importance(k, queries)[0, 0], token_importance(k, queries, spread)[0, 0]
    assert float(plain[1]) == pytest.approx(float(plain[2]))
    assert float(spread_score[1]) > float(spread_score[0]) > float(spread_score[2])


def test_the_shipped_query_spread_is_a_covariance_per_query_head() -> None:
    weights = codec_weights(30, 3, 64)
    assert weights is not None and weights.query_spread is not None
    cov = weights.query_spread
    assert cov.shape == (30, 9, 64, 64) and torch.equal(cov, cov.transpose(-1, -2))
    assert float(torch.linalg.eigvalsh(cov.double()).min()) > -1e-3  # positive semi-definite up to fp16 rounding


def test_query_spread_entries_round_trip() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 3, 6, 6, generator=g)
    cov = a @ a.transpose(-1, -2) / 6
    rows, cols = torch.triu_indices(6, 6)
    data = base64.b64encode(cov[..., rows, cols].half().numpy().astype("<f2").tobytes()).decode()
    back = query_spread_from_json({"data": data}, 2, 3, 6)
    assert torch.allclose(back, cov, atol=2e-3) and torch.equal(back, back.transpose(-1, -2))


def test_the_auto_default_is_the_calibrated_tiered_preset_only_where_a_calibration_ships() -> None:
    from kvstore.codec.format import CALIBRATED_DEFAULT, UNCALIBRATED_DEFAULT, default_codec

    assert default_codec("auto", 30, 3, 64) == CALIBRATED_DEFAULT == "tklt5"  # SmolLM2-135M's shape
    assert default_codec("auto", 2, 2, 16) == UNCALIBRATED_DEFAULT == "int8"  # a tiny test model
    assert default_codec("fp16", 30, 3, 64) == "fp16"
