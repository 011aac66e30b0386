"""Lossy codec presets: group-quantized K/V (``int8``, ``int4``, mixed widths) and SVD keys (``svd``).

Every preset writes all it needs to decode into the block header ``params`` (bit widths, group
sizes, rotation, energy) and decodes from those params alone, never from its own attributes: a
block keeps decoding after a preset's defaults change. One exception: keys coded in a calibrated
basis (``klt*``) need that basis (64x64 per head, too large to carry per block); the block names it by
digest and decoding refuses it where this install's calibration holds another. Packed low-bit codes
travel in ``uint8`` sections, scales and minima in ``float16`` sections; ``kvstore.codec.format`` registers
the instances.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.codec.quant import (
    channel_group,
    dequantize,
    group_along_channels,
    group_along_tokens,
    hadamard,
    pack_bits,
    quantize,
    quantize_symmetric,
    symmetric_low,
    token_group,
    ungroup_tokens,
    unpack_bits,
    water_fill,
)
from kvstore.types import BlockKV

Sections = dict[str, np.ndarray]
Shape = tuple[int, int, int, int]


def _put(sections: Sections, prefix: str, grouped: torch.Tensor, bits: int, symmetric: bool = False) -> None:
    """Quantize ``grouped: [..., group]`` into the packed codes, ``_scale`` and (min-max) ``_low``.

    Codes of widths that divide 8 go tightly packed in ``<prefix>_codes``; the others whole per byte in
    ``<prefix>_bytes`` (:func:`pack_bits` ``aligned``): min-max codes crowd the middle levels, and zstd
    codes aligned bytes near that skewed distribution's entropy but cannot see it through tight packing
    (SmolLM2 ``tklt5`` blocks: 3-bit codes 0.85 of their tight size after zstd instead of 0.95, 5-7 bits
    0.94-0.97 instead of 0.98-1.0, the block 4% smaller). Blocks from before hold ``_codes`` at any width.
    """
    if symmetric:
        codes, scale = quantize_symmetric(grouped, bits)
    else:
        codes, scale, low = quantize(grouped, bits)
        sections[f"{prefix}_low"] = low.numpy()
    aligned = 8 % bits != 0
    sections[f"{prefix}_bytes" if aligned else f"{prefix}_codes"] = pack_bits(codes, bits, aligned).numpy()
    sections[f"{prefix}_scale"] = scale.numpy()


def _get(sections: dict[str, torch.Tensor], prefix: str, bits: int, group: int, symmetric: bool = False
         ) -> torch.Tensor:
    """Dequantize what :func:`_put` stored; the group layout comes from the scale section's shape."""
    scale = sections[f"{prefix}_scale"]
    low = symmetric_low(scale, bits) if symmetric else sections[f"{prefix}_low"]
    if scale.shape != low.shape or scale.shape[-1] != 1:
        raise ValueError(f"{prefix} scale and low sections disagree")
    shape = (*scale.shape[:-1], group)
    aligned = f"{prefix}_bytes" in sections
    packed = sections[f"{prefix}_bytes" if aligned else f"{prefix}_codes"]
    codes = unpack_bits(packed, bits, int(np.prod(shape)), aligned).view(shape)
    return dequantize(codes, scale, low)


LayerBits = int | list[int]  # one width for every layer, or one per layer


def _put_layers(sections: Sections, prefix: str, grouped: torch.Tensor, bits: list[int], symmetric: bool = False
                ) -> LayerBits:
    """Quantize ``grouped: [L, ..., group]`` with ``bits[l]`` for layer l; what goes in the params.

    One width: sections ``<prefix>_*`` (the layout of uniform presets). Several: the layers of
    each width are quantized together into ``<prefix><width>_*``, one batched call per width.
    """
    widths = sorted(set(bits))
    if len(widths) == 1:
        _put(sections, prefix, grouped, widths[0], symmetric)
        return widths[0]
    for width in widths:
        layers = torch.tensor([layer for layer, b in enumerate(bits) if b == width])
        _put(sections, f"{prefix}{width}", grouped[layers], width, symmetric)
    return list(bits)


def _get_layers(sections: dict[str, torch.Tensor], prefix: str, bits: Any, group: int, layers: int,
                symmetric: bool = False) -> torch.Tensor:
    """Inverse of :func:`_put_layers`: ``[L, ..., group]`` float32."""
    if isinstance(bits, int):
        return _get(sections, prefix, bits, group, symmetric)
    if not isinstance(bits, list) or len(bits) != layers or not all(isinstance(b, int) for b in bits):
        raise ValueError(f"{prefix} bits must be one width or one per layer")
    out: torch.Tensor | None = None
    for width in sorted(set(bits)):
        index = torch.tensor([layer for layer, b in enumerate(bits) if b == width])
        part = _get(sections, f"{prefix}{width}", width, group, symmetric)
        if out is None:
            out = torch.empty(layers, *part.shape[1:])
        out[index] = part
    if out is None:
        raise ValueError(f"{prefix} has no layers")
    return out


def layer_bits(bits: int, overrides: tuple[tuple[int, int], ...], layers: int) -> list[int]:
    """Per-layer widths: ``bits`` everywhere but the ``(layer, bits)`` overrides that exist in this model."""
    out = [bits] * layers
    for layer, width in overrides:
        if layer < layers:
            out[layer] = width
    return out


ROTATIONS = ("none", "hadamard")


def _rotation(dim: int, rotate: bool) -> torch.Tensor | None:
    """An orthonormal Hadamard ``[dim, dim]`` when asked and possible (head_dim a power of two)."""
    return hadamard(dim) if rotate and dim & (dim - 1) == 0 else None


def _rotation_param(params: dict[str, Any], key: str, dim: int) -> torch.Tensor | None:
    """The rotation a block's params name (absent: none, the layout before rotated keys existed)."""
    rotate = str(params.get(key, "none"))
    if rotate not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotate!r}")
    return _rotation(dim, rotate == "hadamard")


def encode_keys(k: torch.Tensor, sections: Sections, bits: list[int], group: int, rotate: bool = False
                ) -> dict[str, Any]:
    """Per-channel keys: ``k: [L, H, T, D]`` pre-RoPE, groups of ``group`` tokens per channel.

    With ``rotate`` the channels are first turned by a Hadamard matrix (QuaRot): a pre-RoPE key's
    few large channels are spread over all of them, so every channel's range is set by the same
    energy and low widths lose much less (measured in docs/BENCHMARKS.md).
    """
    group = token_group(k.shape[2], group)
    h = _rotation(k.shape[3], rotate)
    x = k.float() if h is None else k.float() @ h
    stored = _put_layers(sections, "k", group_along_tokens(x, group), bits)
    return {"k_bits": stored, "k_group": group, "k_rotate": "hadamard" if h is not None else "none"}


def decode_keys(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> torch.Tensor:
    grouped = _get_layers(sections, "k", params["k_bits"], int(params["k_group"]), shape[0])
    x = ungroup_tokens(grouped, shape[2])
    h = _rotation_param(params, "k_rotate", shape[3])
    return x if h is None else x @ h.T


def encode_values(v: torch.Tensor, sections: Sections, bits: list[int], group: int, rotate: bool,
                  symmetric: bool = False) -> dict[str, Any]:
    """Per-token values: ``v: [L, H, T, D]``, groups of channels per token.

    A Hadamard rotation of the channels first spreads outlier channels over the whole token, so
    the min-max range of a group is not set by one large channel; rotated groups are near zero-mean,
    so ``symmetric`` levels (a scale, no minimum) cost little and halve the per-group overhead.
    """
    dim = v.shape[3]
    group = channel_group(dim, group)
    h = _rotation(dim, rotate)
    x = v.float() if h is None else v.float() @ h
    stored = _put_layers(sections, "v", group_along_channels(x, group), bits, symmetric)
    params: dict[str, Any] = {"v_bits": stored, "v_group": group, "v_rotate": "hadamard" if h is not None else "none"}
    if symmetric:
        params["v_symmetric"] = True
    return params


def decode_values(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> torch.Tensor:
    symmetric = params.get("v_symmetric", False)
    if not isinstance(symmetric, bool):
        raise ValueError("v_symmetric must be a boolean")
    x = _get_layers(sections, "v", params["v_bits"], int(params["v_group"]), shape[0], symmetric).reshape(shape)
    h = _rotation_param(params, "v_rotate", shape[3])
    return x if h is None else x @ h.T


@dataclass(frozen=True)
class QuantPreset:
    """Keys quantized per channel (pre-RoPE), values per token: KIVI-style group quantization.

    ``k_layers`` / ``v_layers`` give chosen layers another width (``(layer, bits)`` pairs): the few
    layers where quantization error moves the output most, measured one layer at a time, get more
    bits. The header keeps the full per-layer list, so decoding never needs the preset's own fields.
    """

    name: str
    k_bits: int
    v_bits: int
    k_group: int = 64  # tokens per key scale
    v_group: int = 64  # channels per value scale
    v_rotate: bool = False
    k_rotate: bool = False
    k_layers: tuple[tuple[int, int], ...] = ()
    v_layers: tuple[tuple[int, int], ...] = ()
    v_symmetric: bool = False

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]:
        sections: Sections = {}
        layers = block.k.shape[0]
        params = encode_keys(block.k, sections, layer_bits(self.k_bits, self.k_layers, layers), self.k_group,
                             self.k_rotate)
        params |= encode_values(block.v, sections, layer_bits(self.v_bits, self.v_layers, layers), self.v_group,
                                self.v_rotate, self.v_symmetric)
        return sections, params

    def decode(self, sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> BlockKV:
        k = decode_keys(sections, params, shape)
        v = decode_values(sections, params, shape)
        return BlockKV(k=k.to(torch.float16), v=v.to(torch.float16))


def _svd_view(k: torch.Tensor, scope: str) -> torch.Tensor:
    """``k: [L, H, T, D]`` -> the matrices to factor: per head ``[L, H, T, D]``, per layer ``[L, 1, T, H*D]``."""
    if scope == "head":
        return k
    if scope == "layer":
        layers, heads, tokens, dim = k.shape
        return k.permute(0, 2, 1, 3).reshape(layers, 1, tokens, heads * dim)
    raise ValueError(f"unknown svd scope {scope!r}")


def _svd_unview(x: torch.Tensor, scope: str, shape: Shape) -> torch.Tensor:
    if scope == "head":
        return x
    layers, heads, tokens, dim = shape
    return x.reshape(layers, tokens, heads, dim).permute(0, 2, 1, 3)


@dataclass(frozen=True)
class SvdPreset:
    """Pre-RoPE keys as a truncated SVD whose rank adapts to ``energy`` per matrix; values quantized.

    Each layer/head (or layer, ``scope="layer"``) keeps the fewest singular components whose
    squared singular values reach ``energy`` of the total. The kept factors ``A = U * S``
    (``[tokens]`` per component) and ``B = Vh`` (``[dim]`` per component) are quantized per
    component; ranks go in an ``int16`` section so the ragged factors pack densely.
    """

    name: str
    energy: float
    factor_bits: int
    v_bits: int
    v_group: int = 64
    v_rotate: bool = True
    scope: str = "head"

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]:
        m = _svd_view(block.k.float(), self.scope)  # [L, S, T, W]: S matrices per layer, W columns
        u, s, vh = torch.linalg.svd(m, full_matrices=False)  # u: [L, S, T, R], s: [L, S, R], vh: [L, S, R, W]
        energy = (s * s).cumsum(-1) / (s * s).sum(-1, keepdim=True).clamp_min(1e-30)
        rank = ((energy < self.energy).sum(-1) + 1).clamp(max=s.shape[-1])  # [L, S]
        keep = torch.arange(s.shape[-1]) < rank[..., None]  # [L, S, R]
        a = (u * s[..., None, :]).transpose(-1, -2)[keep]  # [kept, T]
        b = vh[keep]  # [kept, W]
        sections: Sections = {"k_rank": rank.to(torch.int16).numpy()}
        _put(sections, "ka", a[:, None, :], self.factor_bits)
        _put(sections, "kb", b[:, None, :], self.factor_bits)
        params: dict[str, Any] = {"energy": self.energy, "factor_bits": self.factor_bits, "svd_scope": self.scope}
        params |= encode_values(block.v, sections, [self.v_bits] * block.v.shape[0], self.v_group, self.v_rotate)
        return sections, params

    def decode(self, sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> BlockKV:
        layers, heads, tokens, dim = shape
        scope = str(params["svd_scope"])
        mats, width = (heads, dim) if scope == "head" else (1, heads * dim)
        full = min(tokens, width)
        rank = sections["k_rank"].long()
        if rank.shape != (layers, mats) or bool((rank < 1).any() | (rank > full).any()):
            raise ValueError("svd ranks do not fit the block shape")
        keep = torch.arange(full) < rank[..., None]  # [L, S, R]
        bits = int(params["factor_bits"])
        a = torch.zeros(layers, mats, full, tokens)
        b = torch.zeros(layers, mats, full, width)
        a[keep] = _get(sections, "ka", bits, tokens)[:, 0]
        b[keep] = _get(sections, "kb", bits, width)[:, 0]
        k = _svd_unview(a.transpose(-1, -2) @ b, scope, shape)
        v = decode_values(sections, params, shape)
        return BlockKV(k=k.to(torch.float16), v=v.to(torch.float16))


WEIGHTS_DIR = Path(__file__).with_name("weights")


@dataclass(frozen=True)
class CodecWeights:
    """A model's measured error costs (``kvstore/codec/weights/*.json``, made by ``bench/codec_calibrate.py``).

    ``keys: [L, H, D]``: KL per unit of squared key range times ``4**-bits`` for one channel (the query
    energy of its RoPE pair over the questions times the head's measured sensitivity); ``values: [L, H]``:
    KL of a head's values at ``4**-bits`` (rotated, symmetric). Only the encoder reads them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None = None  # [L, QH, D]: the mean question query, placed and scaled (tier presets)
    query_spread: torch.Tensor | None = None  # [L, QH, D, D]: those placed queries' covariance (tier presets)
    key_basis: KeyBasis | None = None  # the calibrated key transform (``klt*`` presets)


@dataclass(frozen=True)
class KeyBasis:
    """A calibrated transform of pre-RoPE keys per (layer, KV head): ``x = k @ forward``, ``k = x @ inverse``.

    ``forward: [L, H, D, D]`` is the KLT of the block-centred keys in the metric of the Fisher information
    of the next-token distribution w.r.t. the keys (``bench/codec_calibrate.py``), scaled to max |entry| 1
    per head, so a coefficient's squared error times ``weight: [L, H]`` is its KL cost: every coefficient
    of every head is priced in the same unit and water-filling needs no other weight. ``digest`` names
    the exact matrices; a block records it, because decoding needs the same basis it was encoded with.
    """

    forward: torch.Tensor
    inverse: torch.Tensor
    weight: torch.Tensor
    digest: str


def query_spread_from_json(raw: dict[str, Any], layers: int, q_heads: int, dim: int) -> torch.Tensor:
    """The ``query_spread`` entry: each covariance's upper triangle (diagonal included, row-major) as fp16
    (base64, little-endian) -> ``[L, QH, D, D]`` symmetric."""
    data = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f2").astype(np.float32)
    rows, cols = torch.triu_indices(dim, dim)
    upper = torch.from_numpy(data.copy()).view(layers, q_heads, rows.numel())
    cov = torch.zeros(layers, q_heads, dim, dim)
    cov[..., rows, cols] = upper
    cov[..., cols, rows] = upper
    return cov


def key_basis_from_json(raw: dict[str, Any], shape: list[int]) -> KeyBasis:
    """The ``key_basis`` entry of a calibration file: fp16 matrices (base64, little-endian) and head weights."""
    data = base64.b64decode(raw["data"])
    layers, heads, dim = shape
    forward = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(layers, heads, dim, dim))
    inverse = torch.linalg.inv(forward.double()).float()
    return KeyBasis(forward=forward, inverse=inverse, weight=torch.tensor(raw["weight"]),
                    digest=hashlib.sha256(data).hexdigest()[:16])


@cache
def codec_weights(layers: int, heads: int, dim: int) -> CodecWeights | None:
    """The calibration whose shape is ``[layers, heads, dim]``, if one ships; else None (uniform costs)."""
    for path in sorted(WEIGHTS_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        if raw["shape"] == [layers, heads, dim]:
            queries = torch.tensor(raw["queries"]) if "queries" in raw else None
            spread = (query_spread_from_json(raw["query_spread"], layers, queries.shape[1], dim)
                      if queries is not None and "query_spread" in raw else None)
            basis = key_basis_from_json(raw["key_basis"], raw["shape"]) if "key_basis" in raw else None
            return CodecWeights(keys=torch.tensor(raw["keys"]), values=torch.tensor(raw["values"]), queries=queries,
                                query_spread=spread, key_basis=basis)
    return None


def _block_key_basis(params: dict[str, Any], shape: Shape) -> KeyBasis | None:
    """The key basis a block was encoded in (None: plain channels); refuses a basis this install lacks."""
    digest = params.get("k_basis")
    if digest is None:
        return None
    weights = codec_weights(shape[0], shape[1], shape[3])
    basis = weights.key_basis if weights is not None else None
    if basis is None or basis.digest != digest:
        raise ValueError(f"block keys are in calibrated basis {digest!r}, which this install's "
                         "kvstore/codec/weights does not hold (recalibrated or another model)")
    return basis


def _put_rows(sections: Sections, prefix: str, rows: torch.Tensor, widths: torch.Tensor, symmetric: bool) -> None:
    """Quantize ``rows: [n, ..., group]`` with row i at ``widths[i]`` bits: one batched call per width into
    ``<prefix><width>_*``; rows at 0 bits keep only their mean (``<prefix>0_low``)."""
    for width in sorted({int(w) for w in widths.tolist()}):
        part = rows[widths == width]
        if width == 0:
            sections[f"{prefix}0_low"] = part.mean(-1, keepdim=True).half().numpy()
        else:
            _put(sections, f"{prefix}{width}", part, width, symmetric)


def _get_rows(sections: dict[str, torch.Tensor], prefix: str, widths: torch.Tensor, group: int,
              symmetric: bool) -> torch.Tensor:
    """Inverse of :func:`_put_rows`: ``[n, ..., group]`` float32, ``n = widths.numel()``."""
    out: torch.Tensor | None = None
    for width in sorted({int(w) for w in widths.tolist()}):
        if width == 0:
            low = sections[f"{prefix}0_low"].float()
            part = low.expand(*low.shape[:-1], group)
        elif 2 <= width <= 8:
            part = _get(sections, f"{prefix}{width}", width, group, symmetric)
        else:
            raise ValueError(f"{prefix} width {width} out of range")
        if out is None:
            out = torch.empty(widths.numel(), *part.shape[1:])
        mask = widths == width
        if int(mask.sum()) != part.shape[0]:
            raise ValueError(f"{prefix}{width} holds {part.shape[0]} rows, the widths say {int(mask.sum())}")
        out[mask] = part
    if out is None:
        raise ValueError(f"{prefix} has no rows")
    return out


@dataclass(frozen=True)
class WaterFillPreset:
    """Bits where the answer is sensitive: per-channel key widths and per-head value widths by measured cost.

    Keys stay unrotated and are quantized per channel (min-max over groups of tokens), each channel of
    each head with its own width (0, 2..8), reverse water-filled over the whole block so the mean is
    ``k_bits``: a channel's error costs its squared range (this block's) times its calibrated weight
    (:class:`CodecWeights`; query energy and head sensitivity), so large channels the questions look at
    get 6-8 bits and channels no query reads get 0 (their mean). Values are Hadamard-rotated,
    symmetric per token like ``rot*``, each head at its own width (2..8) from its measured sensitivity.
    The widths travel as ``uint8`` sections, so decoding needs neither the weights nor the budget.
    With ``k_basis`` the keys are first turned into the model's calibrated :class:`KeyBasis` and its
    coefficients take the channels' place (priced by the basis' own weight); decoding then needs that
    same basis, which the block names by digest.
    """

    name: str
    k_bits: float
    v_bits: float
    k_group: int = 256  # tokens per key scale
    v_group: int = 64  # channels per value scale
    k_basis: bool = False  # keys in the calibrated basis (KeyBasis) where the model has one

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]:
        k = block.k.float()  # [L, H, T, D], pre-RoPE
        layers, heads, tokens, dim = k.shape
        weights = codec_weights(layers, heads, dim)
        basis = weights.key_basis if weights is not None and self.k_basis else None
        if basis is not None:
            k = k @ basis.forward.to(k.device)  # [L, H, T, D] coefficients
        group = token_group(tokens, self.k_group)
        grouped = group_along_tokens(k, group)  # [L, H, D, G, group]
        spread = grouped.amax(-1) - grouped.amin(-1)  # [L, H, D, G]
        cost = (spread * spread).mean(-1)  # [L, H, D]
        if basis is not None:
            cost = cost * basis.weight.to(cost.device)[..., None]
        elif weights is not None:
            cost = cost * weights.keys.to(cost.device)
        k_widths = water_fill(cost, self.k_bits).to(torch.uint8)  # [L, H, D]
        sections: Sections = {"k_widths": k_widths.numpy()}
        _put_rows(sections, "k", grouped.reshape(layers * heads * dim, -1, group), k_widths.reshape(-1), False)

        v_cost = weights.values if weights is not None else torch.ones(layers, heads)
        v_widths = water_fill(v_cost, self.v_bits, floor=2).to(torch.uint8)  # [L, H]
        v_group = channel_group(dim, self.v_group)
        h = _rotation(dim, True)
        v = block.v.float() if h is None else block.v.float() @ h
        rows = group_along_channels(v, v_group).reshape(layers * heads, tokens, dim // v_group, v_group)
        sections["v_widths"] = v_widths.numpy()
        _put_rows(sections, "v", rows, v_widths.reshape(-1), True)
        params: dict[str, Any] = {"k_group": group, "v_group": v_group,
                                  "v_rotate": "hadamard" if h is not None else "none",
                                  "k_mean_bits": self.k_bits, "v_mean_bits": self.v_bits}
        if basis is not None:
            params["k_basis"] = basis.digest
        return sections, params

    def decode(self, sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> BlockKV:
        return decode_water_filled(sections, params, shape)


def decode_water_filled(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> BlockKV:
    """Decode what :meth:`WaterFillPreset.encode` wrote, from its sections and params alone."""
    layers, heads, tokens, dim = shape
    k_widths = sections["k_widths"].long()
    v_widths = sections["v_widths"].long()
    if k_widths.shape != (layers, heads, dim) or v_widths.shape != (layers, heads):
        raise ValueError("width sections do not fit the block shape")
    group = int(params["k_group"])
    k_rows = _get_rows(sections, "k", k_widths.reshape(-1), group, False)  # [L*H*D, G, group]
    k = ungroup_tokens(k_rows.reshape(layers, heads, dim, -1, group), tokens)
    basis = _block_key_basis(params, shape)
    if basis is not None:
        k = k @ basis.inverse.to(k.device)
    v_group = int(params["v_group"])
    v_rows = _get_rows(sections, "v", v_widths.reshape(-1), v_group, True)  # [L*H, T, D/g, g]
    v = v_rows.reshape(shape)
    h = _rotation_param(params, "v_rotate", dim)
    if h is not None:
        v = v @ h.T
    return BlockKV(k=k.to(torch.float16), v=v.to(torch.float16))


@dataclass(frozen=True)
class Tier:
    """A share of every (layer, KV head)'s tokens and the water-filled widths they are stored at."""

    fraction: float
    widths: WaterFillPreset


TIER_BITS = 2  # a block holds at most 2**TIER_BITS tiers


def token_importance(k: torch.Tensor, queries: torch.Tensor | None, spread: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``[L, H, T]``: how much attention a later question is expected to pay each token of ``k: [L, H, T, D]``.

    With calibrated ``queries: [L, QH, D]`` (the mean question query placed 40-620 tokens after the key,
    :class:`CodecWeights`), a token's score is the softmax over the block of its logit, summed over the
    query heads sharing the KV head. With the queries' calibrated covariance ``spread: [L, QH, D, D]`` the
    logit is ``E[log-sum of exp]`` for Gaussian queries, ``mean @ k + k @ spread @ k / 2``: a key in a
    direction questions vary along draws attention from some of them, which the mean query misses (SmolLM2
    tklt5: KL 14% lower on the 50-question codec bench). Without a calibration, the key's norm: a weak
    stand-in (it ranks the tokens questions attend to no better than chance on SmolLM2), but it keeps such
    models encoding.
    """
    layers, heads, tokens, dim = k.shape
    if queries is None:
        return k.float().norm(dim=-1)
    kf = k.float()
    q = queries.to(k.device, torch.float32).view(layers, heads, -1, dim)  # [L, H, G, D]
    logits = torch.einsum("lhgd,lhtd->lhgt", q, kf)
    if spread is not None:
        cov = spread.to(k.device, torch.float32).view(layers, heads, -1, dim, dim)  # [L, H, G, D, D]
        logits = logits + 0.5 * torch.einsum("lhtd,lhgde,lhte->lhgt", kf, cov, kf)
    return logits.softmax(-1).sum(2)


def tier_sizes(tokens: int, fractions: list[float]) -> list[int]:
    """Tokens per tier for a block of ``tokens``: each but the last its fraction, the last the rest."""
    sizes = [min(round(f * tokens), tokens) for f in fractions[:-1]]
    for i in range(1, len(sizes)):
        sizes[i] = min(sizes[i], tokens - sum(sizes[:i]))
    return [*sizes, tokens - sum(sizes)]


def assign_tiers(score: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``score: [L, H, T]`` -> ``[L, H, T]`` tier indices: the ``sizes[0]`` best-scored tokens of each
    (layer, head) tier 0, the next ``sizes[1]`` tier 1, and so on."""
    ranking = score.argsort(-1, descending=True)  # [L, H, T]: token indices, best first
    by_rank = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(ranking)  # [T]
    return torch.empty_like(ranking).scatter_(-1, ranking, by_rank.expand_as(ranking))


def _tier_order(tier: torch.Tensor) -> torch.Tensor:
    """``[L, H, T]`` token indices grouped by tier, in token order within a tier (encode and decode agree)."""
    return tier.argsort(dim=-1, stable=True)


def _tokens_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x: [L, H, T, D]`` at ``index: [L, H, n]`` -> ``[L, H, n, D]``.

    Whole rows of D picked from the flattened tokens: several times faster than ``gather`` along T.
    """
    layers, heads, tokens, dim = x.shape
    rows = index + torch.arange(layers * heads, device=index.device).view(layers, heads, 1) * tokens
    return x.reshape(-1, dim).index_select(0, rows.reshape(-1)).view(layers, heads, -1, dim)


@dataclass(frozen=True)
class TieredPreset:
    """Token-importance precision: each (layer, KV head)'s tokens in tiers, the ones questions are expected
    to attend to most at high water-filled widths, the rest at low ones.

    A question reads a block through its attention, which a few tokens per head dominate; the
    calibrated mean question query (:func:`token_importance`) finds most of them from the block's own
    keys, so encoding needs only the block. Every (layer, head) puts the same number of tokens in each
    tier, so a tier is a ``[L, H, n, D]`` sub-block coded by :class:`WaterFillPreset` in sections
    prefixed ``t<i>_``. The tier of every token is a packed section: decoding needs no calibration.
    (An fp16 top tier was measured and dropped: 1% exact + 15% at ``wf45`` widths lost to 20% at
    ``wf45`` widths on ratio and KL, docs/BENCHMARKS.md.)
    """

    name: str
    tiers: tuple[Tier, ...]  # best first; the last takes the tokens the others leave

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]:
        layers, heads, tokens, dim = block.k.shape
        weights = codec_weights(layers, heads, dim)
        queries = weights.queries if weights is not None else None
        spread = weights.query_spread if weights is not None else None
        sizes = tier_sizes(tokens, [t.fraction for t in self.tiers])
        tier = assign_tiers(token_importance(block.k, queries, spread), sizes)  # [L, H, T]
        order = _tier_order(tier)
        sections: Sections = {"tier": pack_bits(tier.to(torch.uint8), TIER_BITS).numpy()}
        specs: list[dict[str, Any]] = []
        start = 0
        for i, (spec, size) in enumerate(zip(self.tiers, sizes, strict=True)):
            index = order[..., start:start + size]
            start += size
            part = BlockKV(k=_tokens_at(block.k, index), v=_tokens_at(block.v, index))
            params: dict[str, Any] = {"tokens": size}
            if size:
                sub, wf_params = spec.widths.encode(part)
                params |= wf_params
                sections |= {f"t{i}_{name}": array for name, array in sub.items()}
            specs.append(params)
        importance = "key_norm" if queries is None else "query" if spread is None else "query_spread"
        return sections, {"tiers": specs, "importance": importance}

    def decode(self, sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> BlockKV:
        layers, heads, tokens, dim = shape
        specs = params["tiers"]
        sizes = [int(spec["tokens"]) for spec in specs]
        if not 0 < len(sizes) <= 1 << TIER_BITS or min(sizes) < 0 or sum(sizes) != tokens:
            raise ValueError("tier sizes do not fit the block")
        tier = unpack_bits(sections["tier"], TIER_BITS, layers * heads * tokens).view(layers, heads, tokens).long()
        per_head = torch.nn.functional.one_hot(tier, 1 << TIER_BITS).sum(2)  # [L, H, tiers]: tokens of each
        if not bool((per_head == torch.tensor(sizes + [0] * ((1 << TIER_BITS) - len(sizes)))).all()):
            raise ValueError("the tier section disagrees with the tier sizes")
        parts = []
        for i, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
            if not size:
                continue
            sub = {name.removeprefix(f"t{i}_"): t for name, t in sections.items() if name.startswith(f"t{i}_")}
            parts.append(decode_water_filled(sub, spec, (layers, heads, size, dim)))
        back = _tier_order(tier).argsort(dim=-1)  # [L, H, T]: where each token sits in the tier-sorted parts
        k = _tokens_at(torch.cat([p.k for p in parts], 2), back)
        v = _tokens_at(torch.cat([p.v for p in parts], 2), back)
        return BlockKV(k=k, v=v)

# Per-layer widths of the rotated presets, measured on SmolLM2-135M (30 layers) one layer at a time at
# 2 bits (KL vs fp16 over 12 SQuAD questions): key layer 18 moves the output 0.053 nats, 23 0.012,
# 17 0.005, 24/3/20/14/7/8 0.002-0.003, the rest <= 0.002; value layers 18 and 23 0.006 and 0.004,
# and 13/25/16/12/19/27/0/11/10/20 <= 0.0003. Other models keep the layer indices that exist.
_SENSITIVE_K = ((18, 6), (23, 4), (17, 4), (24, 4), (3, 4), (20, 4), (14, 4), (7, 4), (8, 4))
_QUIET_V = tuple((layer, 2) for layer in (13, 25, 16, 12, 19, 27, 0, 11, 10, 20))

_WF45 = WaterFillPreset("wf45", k_bits=4.5, v_bits=4.5)
_WF3 = WaterFillPreset("wf3", k_bits=3.0, v_bits=3.0)
_WF27 = WaterFillPreset("wf27", k_bits=2.7, v_bits=2.7)

LOSSY_PRESETS: tuple[QuantPreset | SvdPreset | WaterFillPreset | TieredPreset, ...] = (
    QuantPreset("int8", k_bits=8, v_bits=8, k_group=64, v_group=64),
    QuantPreset("int4", k_bits=4, v_bits=4, k_group=32, v_group=32),
    QuantPreset("k4v3", k_bits=4, v_bits=3, k_group=128, v_group=64, v_rotate=True),
    QuantPreset("k3v3", k_bits=3, v_bits=3, k_group=256, v_group=64, v_rotate=True),
    QuantPreset("k2v2", k_bits=2, v_bits=2, k_group=64, v_group=32, v_rotate=True),
    # Hadamard-rotated keys and values, values symmetric: 6, 5 or 4 bits, key layer 18 two more.
    QuantPreset("rot6", k_bits=6, v_bits=6, k_group=256, v_group=64, v_rotate=True, k_rotate=True,
                k_layers=((18, 8),), v_symmetric=True),
    QuantPreset("rot5", k_bits=5, v_bits=5, k_group=256, v_group=64, v_rotate=True, k_rotate=True,
                k_layers=((18, 7),), v_symmetric=True),
    QuantPreset("rot4", k_bits=4, v_bits=4, k_group=256, v_group=64, v_rotate=True, k_rotate=True,
                k_layers=((18, 6),), v_symmetric=True),
    # ~3.1 bits: 3-bit rotated K/V, sensitive key layers at 4-6 bits paid for by quiet value layers at 2.
    QuantPreset("mix3", k_bits=3, v_bits=3, k_group=256, v_group=64, v_rotate=True, k_rotate=True,
                k_layers=_SENSITIVE_K, v_layers=(*_QUIET_V, (18, 4), (23, 4)), v_symmetric=True),
    # ~2 bits: 2-bit rotated K/V, the most sensitive layers one or two bits more.
    QuantPreset("mix2", k_bits=2, v_bits=2, k_group=256, v_group=64, v_rotate=True, k_rotate=True,
                k_layers=((18, 4), (23, 3), (17, 3), (24, 3), (3, 3), (20, 3)), v_layers=((18, 3), (23, 3)),
                v_symmetric=True),
    # Widths by measured cost (codec_weights), mean code bits per key channel / value head; with scales
    # the stored block is ~3.5x (wf45), ~5.2x (wf31), ~5.4x (wf3), ~6x (wf27) and ~8.4x (wf2) below fp16.
    _WF45,
    WaterFillPreset("wf31", k_bits=3.15, v_bits=3.05),
    _WF3,
    _WF27,
    WaterFillPreset("wf2", k_bits=2.0, v_bits=2.0),
    # Per (layer, KV head): the share of tokens a question is expected to attend to most at more bits, the
    # rest at fewer: ~4.4x, ~5.0x and ~5.5x below fp16. At ~5.5x 40% at 3.5 bits beat 15% at 4.5 (13 questions).
    TieredPreset("tier45", (Tier(0.30, _WF45), Tier(1.0, _WF3))),
    TieredPreset("tier5", (Tier(0.20, _WF45), Tier(1.0, _WF27))),
    TieredPreset("tier55", (Tier(0.40, WaterFillPreset("wf35", k_bits=3.5, v_bits=3.5)),
                            Tier(1.0, WaterFillPreset("wf23", k_bits=2.3, v_bits=2.3)))),
    # Keys in the calibrated Fisher-metric KLT basis (KeyBasis): at 2.7 bits they cost ~5x less KL than wf31's
    # unrotated keys at 3.15, so the bits saved go to the values: ~5.2x (13 questions: KL 1.5e-3, wf31 4.9e-3).
    # Tiered as tier5 (the expected-attention tokens at more bits): ~5.04x. 25% at keys 3.6 / values 4.6 bits, the
    # rest 2.5 / 3.3: the lowest KL at >= 5x of five splits (25-35% on top) measured with the 30-question
    # calibration (50 questions: KL 4.6e-4; the others 4.7e-4 to 6.6e-4).
    WaterFillPreset("klt5", k_bits=2.7, v_bits=3.5, k_basis=True),
    TieredPreset("tklt5", (Tier(0.25, WaterFillPreset("klt-hi", k_bits=3.6, v_bits=4.6, k_basis=True)),
                           Tier(1.0, WaterFillPreset("klt-lo", k_bits=2.5, v_bits=3.3, k_basis=True)))),
    SvdPreset("svd", energy=0.99, factor_bits=8, v_bits=4),
    SvdPreset("svd-layer", energy=0.95, factor_bits=4, v_bits=4, scope="layer"),
)
