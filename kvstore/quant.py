"""Vectorized math of the lossy codec presets: group quantization, bit packing, truncated SVD.

Everything here is batched torch over whole blocks (no per-layer or per-head Python loops), so a
block of any shape encodes and decodes in a handful of kernel calls. Shapes follow the runner:
``k, v: [layers, kv_heads, tokens, head_dim]``; keys are pre-RoPE.

Quantization is asymmetric min-max over groups (KIVI): keys per channel (a group runs along
tokens, because pre-RoPE keys have a few large fixed channels), values per token (a group runs
along channels). Scales and minima are stored in fp16 and the codes are computed against those
rounded values, so decode reproduces exactly what encode measured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MIN_SCALE = 1e-6  # keeps constant groups (scale 0) finite; fp16 still represents it


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8, each < 2**bits, any shape) into ``[ceil(n * bits / 8)]`` uint8, LSB first."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    if 8 % bits == 0:
        # 1, 2, 4 bits: whole codes per byte, no code straddles a byte boundary.
        per_byte = 8 // bits
        lanes = F.pad(flat, (0, (-flat.numel()) % per_byte)).view(-1, per_byte).to(torch.int32)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        return (lanes << shifts).sum(-1).to(torch.uint8)
    # Any other width (3, 5, 6, 7): spread every code into its bits, then gather bits into bytes.
    bitplanes = (flat[:, None].to(torch.int32) >> torch.arange(bits, dtype=torch.int32)) & 1  # [n, bits]
    stream = bitplanes.reshape(-1)
    stream = F.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as ``[count]`` uint8."""
    flat = packed.reshape(-1).to(torch.int32)
    if math.ceil(count * bits / 8) > flat.numel():
        raise ValueError(f"{flat.numel()} packed bytes hold fewer than {count} codes of {bits} bits")
    if bits == 8:
        return flat[:count].to(torch.uint8)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        return ((flat[:, None] >> shifts) & mask).reshape(-1)[:count].to(torch.uint8)
    stream = ((flat[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)[:count * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int32)
    return (stream.view(count, bits) * weights).sum(-1).to(torch.uint8)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize the last axis of ``x: [..., group]``.

    Returns ``codes: [..., group]`` uint8, ``scale, low: [..., 1]`` fp16, with
    ``x ~= codes * scale + low``.
    """
    x = x.float()
    levels = (1 << bits) - 1
    low = x.amin(-1, keepdim=True).half()
    high = x.amax(-1, keepdim=True)
    scale = ((high - low.float()) / levels).clamp_min(_MIN_SCALE).half()
    codes = ((x - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``codes: [..., group]``, ``scale, low: [..., 1]`` -> float32 ``[..., group]``."""
    return codes.float() * scale.float() + low.float()


def group_along_tokens(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x: [L, H, T, D]`` -> ``[L, H, D, ceil(T / group), group]``: per-channel groups of tokens.

    The last group is padded by repeating the last token, which leaves its min and max unchanged.
    """
    tokens = x.shape[2]
    pad = (-tokens) % group
    if pad:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    layers, heads, padded, dim = x.shape
    return x.transpose(2, 3).reshape(layers, heads, dim, padded // group, group)


def ungroup_tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Inverse of :func:`group_along_tokens`: ``[L, H, D, G, group]`` -> ``[L, H, tokens, D]``."""
    layers, heads, dim = x.shape[:3]
    return x.reshape(layers, heads, dim, -1)[..., :tokens].transpose(2, 3)


def group_along_channels(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x: [L, H, T, D]`` -> ``[L, H, T, D / group, group]``: per-token groups of channels."""
    layers, heads, tokens, dim = x.shape
    if dim % group:
        raise ValueError(f"head_dim {dim} is not a multiple of the channel group {group}")
    return x.reshape(layers, heads, tokens, dim // group, group)


def channel_group(dim: int, wanted: int) -> int:
    """The largest divisor of ``dim`` that is <= ``wanted`` (head dims are not always powers of 2)."""
    return max(g for g in range(1, min(dim, wanted) + 1) if dim % g == 0)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix ``[n, n]`` (n a power of two), float32."""
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power of two, not {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)
