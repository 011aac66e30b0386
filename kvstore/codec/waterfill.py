"""The water-filled presets (``wf*``, ``klt*``): bits where the answer is sensitive, by the model's calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.codec.calibration import KeyBasis, codec_weights
from kvstore.codec.quant import (
    channel_group,
    group_along_channels,
    group_along_tokens,
    token_group,
    ungroup_tokens,
    water_fill,
)
from kvstore.codec.sections import Sections, Shape, get_codes, put_codes, rotation, rotation_param
from kvstore.types import BlockKV


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
            put_codes(sections, f"{prefix}{width}", part, width, symmetric)


def _get_rows(sections: dict[str, torch.Tensor], prefix: str, widths: torch.Tensor, group: int,
              symmetric: bool) -> torch.Tensor:
    """Inverse of :func:`_put_rows`: ``[n, ..., group]`` float32, ``n = widths.numel()``."""
    out: torch.Tensor | None = None
    for width in sorted({int(w) for w in widths.tolist()}):
        if width == 0:
            low = sections[f"{prefix}0_low"].float()
            part = low.expand(*low.shape[:-1], group)
        elif 2 <= width <= 8:
            part = get_codes(sections, f"{prefix}{width}", width, group, symmetric)
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
        h = rotation(dim, True)
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
    h = rotation_param(params, "v_rotate", dim)
    if h is not None:
        v = v @ h.T
    return BlockKV(k=k.to(torch.float16), v=v.to(torch.float16))
