"""Lossy codec presets: group-quantized K/V (``int8``, ``int4``, mixed widths) and SVD keys (``svd``).

Every preset writes all it needs to decode into the block header ``params`` (bit widths, group
sizes, rotation, energy) and decodes from those params alone, never from its own attributes: a
block keeps decoding after a preset's defaults change. Packed low-bit codes travel in ``uint8``
sections, scales and minima in ``float16`` sections; ``kvstore.codec`` registers the instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .quant import (
    channel_group,
    dequantize,
    group_along_channels,
    group_along_tokens,
    hadamard,
    pack_bits,
    quantize,
    ungroup_tokens,
    unpack_bits,
)
from .runner import BlockKV

Sections = dict[str, np.ndarray]
Shape = tuple[int, int, int, int]


def _put(sections: Sections, prefix: str, grouped: torch.Tensor, bits: int) -> None:
    """Quantize ``grouped: [..., group]`` into ``<prefix>_codes`` (packed), ``_scale`` and ``_low``."""
    codes, scale, low = quantize(grouped, bits)
    sections[f"{prefix}_codes"] = pack_bits(codes, bits).numpy()
    sections[f"{prefix}_scale"] = scale.numpy()
    sections[f"{prefix}_low"] = low.numpy()


def _get(sections: dict[str, torch.Tensor], prefix: str, bits: int, group: int) -> torch.Tensor:
    """Dequantize what :func:`_put` stored; the group layout comes from the scale section's shape."""
    scale, low = sections[f"{prefix}_scale"], sections[f"{prefix}_low"]
    if scale.shape != low.shape or scale.shape[-1] != 1:
        raise ValueError(f"{prefix} scale and low sections disagree")
    shape = (*scale.shape[:-1], group)
    codes = unpack_bits(sections[f"{prefix}_codes"], bits, int(np.prod(shape))).view(shape)
    return dequantize(codes, scale, low)


def _rotation(dim: int, rotate: bool) -> torch.Tensor | None:
    """An orthonormal Hadamard ``[dim, dim]`` when asked and possible (head_dim a power of two)."""
    return hadamard(dim) if rotate and dim & (dim - 1) == 0 else None


def encode_keys(k: torch.Tensor, sections: Sections, bits: int, group: int) -> dict[str, Any]:
    """Per-channel keys: ``k: [L, H, T, D]`` pre-RoPE, groups of ``group`` tokens per channel."""
    group = max(1, min(group, k.shape[2]))
    _put(sections, "k", group_along_tokens(k.float(), group), bits)
    return {"k_bits": bits, "k_group": group}


def decode_keys(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> torch.Tensor:
    grouped = _get(sections, "k", int(params["k_bits"]), int(params["k_group"]))
    return ungroup_tokens(grouped, shape[2])


def encode_values(v: torch.Tensor, sections: Sections, bits: int, group: int, rotate: bool) -> dict[str, Any]:
    """Per-token values: ``v: [L, H, T, D]``, groups of channels per token.

    A Hadamard rotation of the channels first spreads outlier channels over the whole token, so
    the min-max range of a group is not set by one large channel.
    """
    dim = v.shape[3]
    group = channel_group(dim, group)
    h = _rotation(dim, rotate)
    x = v.float() if h is None else v.float() @ h
    _put(sections, "v", group_along_channels(x, group), bits)
    return {"v_bits": bits, "v_group": group, "v_rotate": "hadamard" if h is not None else "none"}


def decode_values(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> torch.Tensor:
    x = _get(sections, "v", int(params["v_bits"]), int(params["v_group"])).reshape(shape)
    rotate = str(params["v_rotate"])
    if rotate not in ("none", "hadamard"):
        raise ValueError(f"unknown value rotation {rotate!r}")
    h = _rotation(shape[3], rotate == "hadamard")
    return x if h is None else x @ h.T


@dataclass(frozen=True)
class QuantPreset:
    """Keys quantized per channel (pre-RoPE), values per token: KIVI-style group quantization."""

    name: str
    k_bits: int
    v_bits: int
    k_group: int = 64  # tokens per key scale
    v_group: int = 64  # channels per value scale
    v_rotate: bool = False

    def encode(self, block: BlockKV) -> tuple[Sections, dict[str, Any]]:
        sections: Sections = {}
        params = encode_keys(block.k, sections, self.k_bits, self.k_group)
        params |= encode_values(block.v, sections, self.v_bits, self.v_group, self.v_rotate)
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
        params |= encode_values(block.v, sections, self.v_bits, self.v_group, self.v_rotate)
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


LOSSY_PRESETS: tuple[QuantPreset | SvdPreset, ...] = (
    QuantPreset("int8", k_bits=8, v_bits=8, k_group=64, v_group=64),
    QuantPreset("int4", k_bits=4, v_bits=4, k_group=32, v_group=32),
    QuantPreset("k4v3", k_bits=4, v_bits=3, k_group=128, v_group=64, v_rotate=True),
    QuantPreset("k3v3", k_bits=3, v_bits=3, k_group=256, v_group=64, v_rotate=True),
    QuantPreset("k2v2", k_bits=2, v_bits=2, k_group=64, v_group=32, v_rotate=True),
    SvdPreset("svd", energy=0.99, factor_bits=8, v_bits=4),
    SvdPreset("svd-layer", energy=0.95, factor_bits=4, v_bits=4, scope="layer"),
)
