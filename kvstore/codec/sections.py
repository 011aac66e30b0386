"""How a lossy preset stores tensors: group-quantized codes, scales and minima as named sections, optionally
per layer at different widths and after a Hadamard rotation; keys per channel, values per token.

Packed low-bit codes travel in ``uint8`` sections, scales and minima in ``float16`` sections. Every function
that writes sections returns the params decoding needs, and decoding reads nothing else.
"""

from __future__ import annotations

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
)

Sections = dict[str, np.ndarray]
Shape = tuple[int, int, int, int]


def put_codes(sections: Sections, prefix: str, grouped: torch.Tensor, bits: int, symmetric: bool = False) -> None:
    """Quantize ``grouped: [..., group]`` into the packed codes, ``_scale`` and (min-max) ``_low``.

    Codes of widths that divide 8 go tightly packed in ``<prefix>_codes``; the others whole per byte in
    ``<prefix>_bytes`` (:func:`pack_bits` ``aligned``): min-max codes crowd the middle levels, and zstd
    codes aligned bytes near that skewed distribution's entropy but cannot see it through tight packing, so
    the stored block is smaller. Blocks from before hold ``_codes`` at any width.
    """
    if symmetric:
        codes, scale = quantize_symmetric(grouped, bits)
    else:
        codes, scale, low = quantize(grouped, bits)
        sections[f"{prefix}_low"] = low.numpy()
    aligned = 8 % bits != 0
    sections[f"{prefix}_bytes" if aligned else f"{prefix}_codes"] = pack_bits(codes, bits, aligned).numpy()
    sections[f"{prefix}_scale"] = scale.numpy()


def get_codes(sections: dict[str, torch.Tensor], prefix: str, bits: int, group: int, symmetric: bool = False
         ) -> torch.Tensor:
    """Dequantize what :func:`put_codes` stored; the group layout comes from the scale section's shape."""
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


def put_layers(sections: Sections, prefix: str, grouped: torch.Tensor, bits: list[int], symmetric: bool = False
                ) -> LayerBits:
    """Quantize ``grouped: [L, ..., group]`` with ``bits[l]`` for layer l; what goes in the params.

    One width: sections ``<prefix>_*`` (the layout of uniform presets). Several: the layers of
    each width are quantized together into ``<prefix><width>_*``, one batched call per width.
    """
    widths = sorted(set(bits))
    if len(widths) == 1:
        put_codes(sections, prefix, grouped, widths[0], symmetric)
        return widths[0]
    for width in widths:
        layers = torch.tensor([layer for layer, b in enumerate(bits) if b == width])
        put_codes(sections, f"{prefix}{width}", grouped[layers], width, symmetric)
    return list(bits)


def get_layers(sections: dict[str, torch.Tensor], prefix: str, bits: Any, group: int, layers: int,
                symmetric: bool = False) -> torch.Tensor:
    """Inverse of :func:`put_layers`: ``[L, ..., group]`` float32."""
    if isinstance(bits, int):
        return get_codes(sections, prefix, bits, group, symmetric)
    if not isinstance(bits, list) or len(bits) != layers or not all(isinstance(b, int) for b in bits):
        raise ValueError(f"{prefix} bits must be one width or one per layer")
    out: torch.Tensor | None = None
    for width in sorted(set(bits)):
        index = torch.tensor([layer for layer, b in enumerate(bits) if b == width])
        part = get_codes(sections, f"{prefix}{width}", width, group, symmetric)
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


def rotation(dim: int, rotate: bool) -> torch.Tensor | None:
    """An orthonormal Hadamard ``[dim, dim]`` when asked and possible (head_dim a power of two)."""
    return hadamard(dim) if rotate and dim & (dim - 1) == 0 else None


def rotation_param(params: dict[str, Any], key: str, dim: int) -> torch.Tensor | None:
    """The rotation a block's params name (absent: none, the layout before rotated keys existed)."""
    rotate = str(params.get(key, "none"))
    if rotate not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotate!r}")
    return rotation(dim, rotate == "hadamard")


def encode_keys(k: torch.Tensor, sections: Sections, bits: list[int], group: int, rotate: bool = False
                ) -> dict[str, Any]:
    """Per-channel keys: ``k: [L, H, T, D]`` pre-RoPE, groups of ``group`` tokens per channel.

    With ``rotate`` the channels are first turned by a Hadamard matrix (QuaRot): a pre-RoPE key's
    few large channels are spread over all of them, so every channel's range is set by the same
    energy and low widths lose much less.
    """
    group = token_group(k.shape[2], group)
    h = rotation(k.shape[3], rotate)
    x = k.float() if h is None else k.float() @ h
    stored = put_layers(sections, "k", group_along_tokens(x, group), bits)
    return {"k_bits": stored, "k_group": group, "k_rotate": "hadamard" if h is not None else "none"}


def decode_keys(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> torch.Tensor:
    grouped = get_layers(sections, "k", params["k_bits"], int(params["k_group"]), shape[0])
    x = ungroup_tokens(grouped, shape[2])
    h = rotation_param(params, "k_rotate", shape[3])
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
    h = rotation(dim, rotate)
    x = v.float() if h is None else v.float() @ h
    stored = put_layers(sections, "v", group_along_channels(x, group), bits, symmetric)
    params: dict[str, Any] = {"v_bits": stored, "v_group": group, "v_rotate": "hadamard" if h is not None else "none"}
    if symmetric:
        params["v_symmetric"] = True
    return params


def decode_values(sections: dict[str, torch.Tensor], params: dict[str, Any], shape: Shape) -> torch.Tensor:
    symmetric = params.get("v_symmetric", False)
    if not isinstance(symmetric, bool):
        raise ValueError("v_symmetric must be a boolean")
    x = get_layers(sections, "v", params["v_bits"], int(params["v_group"]), shape[0], symmetric).reshape(shape)
    h = rotation_param(params, "v_rotate", shape[3])
    return x if h is None else x @ h.T
