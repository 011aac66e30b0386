"""The tiered presets (``tier*``, ``tklt5``): each head's tokens a question is expected to attend to most at more
bits, the rest at fewer, each tier a water-filled sub-block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstore.codec.calibration import codec_weights
from kvstore.codec.quant import pack_bits, unpack_bits
from kvstore.codec.sections import Sections, Shape
from kvstore.codec.waterfill import WaterFillPreset, decode_water_filled
from kvstore.types import BlockKV


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
    direction questions vary along draws attention from some of them, which the mean query misses. Without a
    calibration, the key's norm: a weak stand-in, but it keeps such models encoding.
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
