"""The registry of lossy codec presets (``LOSSY_PRESETS``; ``kvstore.codec.format`` registers them by name), and
the two plain ones: group-quantized K/V (:class:`QuantPreset`: ``int8``, ``int4``, rotated and mixed widths) and
SVD keys (:class:`SvdPreset`).

A bank may newly choose only ``auto``, ``fp16``, ``int8`` or ``tklt5`` (``kvstore.codec.format.CHOOSABLE``); every
other preset stays registered so that stored blocks keep decoding and a bank created with one keeps writing with it.

Every preset writes all it needs to decode into the block header ``params`` (bit widths, group sizes, rotation,
energy; :mod:`kvstore.codec.sections`) and decodes from those params alone, never from its own attributes: a block
keeps decoding after a preset's defaults change. One exception: keys coded in a calibrated basis (``klt*``,
:mod:`kvstore.codec.waterfill`) need that basis (64x64 per head, too large to carry per block); the block names it
by digest and decoding refuses it where this install's calibration holds another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.codec.sections import (
    Sections,
    Shape,
    decode_keys,
    decode_values,
    encode_keys,
    encode_values,
    get_codes,
    layer_bits,
    put_codes,
)
from kvstore.codec.tiered import Tier, TieredPreset
from kvstore.codec.waterfill import WaterFillPreset
from kvstore.types import BlockKV


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
        put_codes(sections, "ka", a[:, None, :], self.factor_bits)
        put_codes(sections, "kb", b[:, None, :], self.factor_bits)
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
        a[keep] = get_codes(sections, "ka", bits, tokens)[:, 0]
        b[keep] = get_codes(sections, "kb", bits, width)[:, 0]
        k = _svd_unview(a.transpose(-1, -2) @ b, scope, shape)
        v = decode_values(sections, params, shape)
        return BlockKV(k=k.to(torch.float16), v=v.to(torch.float16))


# Per-layer widths of the rotated presets: the layers of SmolLM2-135M (30 layers) where 2-bit quantization moves
# the output most, measured one layer at a time (key layer 18 far ahead, then 23 and 17), get more bits, and the
# quietest value layers fewer. Other models keep the layer indices that exist.
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
    # Widths by measured cost (codec_weights), mean code bits per key channel / value head.
    _WF45,
    WaterFillPreset("wf31", k_bits=3.15, v_bits=3.05),
    _WF3,
    _WF27,
    WaterFillPreset("wf2", k_bits=2.0, v_bits=2.0),
    # Per (layer, KV head): the share of tokens a question is expected to attend to most at more bits, the
    # rest at fewer.
    TieredPreset("tier45", (Tier(0.30, _WF45), Tier(1.0, _WF3))),
    TieredPreset("tier5", (Tier(0.20, _WF45), Tier(1.0, _WF27))),
    TieredPreset("tier55", (Tier(0.40, WaterFillPreset("wf35", k_bits=3.5, v_bits=3.5)),
                            Tier(1.0, WaterFillPreset("wf23", k_bits=2.3, v_bits=2.3)))),
    # Keys in the calibrated Fisher-metric KLT basis (KeyBasis) cost far less at low widths than plain channels,
    # so the bits saved go to the values; tklt5 tiers them as tier5 does (the expected-attention tokens at more
    # bits), the split with the lowest loss at about 5x below fp16.
    WaterFillPreset("klt5", k_bits=2.7, v_bits=3.5, k_basis=True),
    TieredPreset("tklt5", (Tier(0.25, WaterFillPreset("klt-hi", k_bits=3.6, v_bits=4.6, k_basis=True)),
                           Tier(1.0, WaterFillPreset("klt-lo", k_bits=2.5, v_bits=3.3, k_basis=True)))),
    SvdPreset("svd", energy=0.99, factor_bits=8, v_bits=4),
    SvdPreset("svd-layer", energy=0.95, factor_bits=4, v_bits=4, scope="layer"),
)
