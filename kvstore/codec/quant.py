"""Vectorized math of the lossy codec presets: group quantization, bit packing, truncated SVD.

Everything here is batched torch over whole blocks (no per-layer or per-head Python loops), so a
block of any shape encodes and decodes in a handful of kernel calls. Shapes follow the runner:
``k, v: [layers, kv_heads, tokens, head_dim]``; keys are pre-RoPE.

Quantization is asymmetric min-max over groups (KIVI): keys per channel (a group runs along
tokens, because pre-RoPE keys have a few large fixed channels), values per token (a group runs
along channels). Scales and minima are stored in fp16 and the codes are computed against those
rounded values, so decode reproduces exactly what encode measured. Rotated presets turn keys and
values by a Hadamard matrix first and may store values with symmetric levels (a scale, no minimum).
Bit packing of any width is whole-tensor shifts over 8 codes at a time (3 bits: 8 codes in 3 bytes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MIN_SCALE = 1e-6  # keeps constant groups (scale 0) finite; fp16 still represents it


def _word_dtype(bits: int) -> torch.dtype:
    """An integer type holding 8 codes of ``bits`` bits without touching its sign bit."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def pack_bits(codes: torch.Tensor, bits: int, aligned: bool = False) -> torch.Tensor:
    """Pack ``codes`` (uint8, each < 2**bits, any shape) into uint8, LSB first.

    Tight (default): ``[ceil(n * bits / 8)]`` bytes; every 8 codes make one ``8 * bits``-bit word (code i
    at bit ``bits * i``), written as ``bits`` little-endian bytes: 8 + ``bits`` whole-tensor shifts for
    any width (3 bits: 8 codes in 3 bytes), and the same byte stream as packing the codes bit by bit.
    ``aligned``: whole codes per byte, ``8 // bits`` of them (3 bits: 2 per byte, 5-7 bits: 1), so no code
    straddles a byte and a byte-wise entropy coder (zstd's Huffman stage) sees the codes' own skewed
    distribution; the same bytes as tight packing for widths dividing 8.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    count = flat.numel()
    if 8 % bits == 0 or aligned:
        per_byte = 8 // bits
        lanes8 = F.pad(flat, (0, (-count) % per_byte)).view(-1, per_byte)  # [bytes, per_byte]
        out = lanes8[:, 0].clone()
        for i in range(1, per_byte):
            out |= lanes8[:, i] << (bits * i)
        return out
    lanes = F.pad(flat, (0, (-count) % 8)).view(-1, 8).to(_word_dtype(bits))  # [words, 8]
    word = lanes[:, 0].clone()
    for i in range(1, 8):
        word |= lanes[:, i] << (bits * i)
    packed = torch.empty(word.shape[0], bits, dtype=torch.uint8)  # [words, bits]
    for j in range(bits):
        packed[:, j] = (word >> (8 * j)) & 0xFF
    return packed.reshape(-1)[:math.ceil(count * bits / 8)]


def packed_size(count: int, bits: int, aligned: bool = False) -> int:
    """Bytes :func:`pack_bits` makes of ``count`` codes."""
    if aligned or 8 % bits == 0:
        return math.ceil(count / (8 // bits))
    return math.ceil(count * bits / 8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int, aligned: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as ``[count]`` uint8."""
    flat = packed.reshape(-1)
    used = packed_size(count, bits, aligned)
    if used > flat.numel():
        raise ValueError(f"{flat.numel()} packed bytes hold fewer than {count} codes of {bits} bits")
    if bits == 8:
        return flat[:count].to(torch.uint8)
    mask = (1 << bits) - 1
    if 8 % bits == 0 or aligned:
        per_byte = 8 // bits
        spread = torch.empty(used, per_byte, dtype=torch.uint8)  # [bytes, per_byte]
        for i in range(per_byte):
            spread[:, i] = (flat[:used] >> (bits * i)) & mask
        return spread.reshape(-1)[:count]
    words = math.ceil(count / 8)
    lanes = F.pad(flat[:used], (0, words * bits - used)).view(words, bits).to(_word_dtype(bits))  # [words, bits]
    word = lanes[:, 0].clone()
    for j in range(1, bits):
        word |= lanes[:, j] << (8 * j)
    codes = torch.empty(words, 8, dtype=torch.uint8)  # [words, 8]
    for i in range(8):
        codes[:, i] = (word >> (bits * i)) & mask
    return codes.reshape(-1)[:count]


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


def quantize_symmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last axis of ``x: [..., group]`` to levels symmetric around zero, scale only.

    Levels are ``(code - (2**bits - 1) / 2) * scale``: no zero level, all ``2**bits`` used. For
    rotated (zero-mean, Gaussian-like) groups this loses little against min-max and stores half
    the overhead. Returns ``codes: [..., group]`` uint8 and ``scale: [..., 1]`` fp16.
    """
    x = x.float()
    half = ((1 << bits) - 1) / 2
    scale = (x.abs().amax(-1, keepdim=True) / half).clamp_min(_MIN_SCALE).half()
    codes = (x / scale.float() + half).round_().clamp_(0, 2 * half).to(torch.uint8)
    return codes, scale


def symmetric_low(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``low`` that makes :func:`dequantize` read symmetric codes: ``-scale * (2**bits - 1) / 2``."""
    return scale.float() * -(((1 << bits) - 1) / 2)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``codes: [..., group]``, ``scale, low: [..., 1]`` -> float32 ``[..., group]``."""
    return codes.float() * scale.float() + low.float()


def token_group(tokens: int, wanted: int) -> int:
    """Tokens per key group: at most ``wanted``, as even as possible, so padding stays under one token
    per group (165 tokens in groups of 128 would pad to 256 and store 55% more codes)."""
    wanted = max(1, min(wanted, tokens))
    return -(-tokens // -(-tokens // wanted))


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


def water_fill(scale: torch.Tensor, mean_bits: float, floor: int = 0, high: int = 8) -> torch.Tensor:
    """Integer widths ``b`` (0 or 2..``high``, at least ``floor``) for items whose error is ``scale * 4**-b``.

    Reverse water-filling: every item takes each further bit whose error reduction clears one common
    threshold, found by bisection so the mean width stays within ``mean_bits``. One bit is never
    given (min-max with two levels snaps a channel to its extremes, worse than its mean at 0 bits).
    Returns float widths shaped like ``scale``.
    """
    scale = scale.float()

    def at(log_t: float) -> torch.Tensor:
        t = 2.0 ** log_t
        b = torch.floor(torch.log2(0.75 * scale / t) / 2).add_(1).clamp_(0, high)
        first = scale * (15 / 32) >= t  # the first two bits together, per bit
        return torch.where(first, b.clamp_min(2), torch.zeros_like(b)).clamp_min(floor)

    positive = scale[scale > 0]
    if positive.numel() == 0:
        return at(0.0)
    lo = float(positive.min().log2()) - 2 * high - 4  # every item at ``high``
    hi = float(positive.max().log2()) + 1  # every item at ``floor``
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(at(mid).mean()) > mean_bits:
            lo = mid
        else:
            hi = mid
    return at(hi)
