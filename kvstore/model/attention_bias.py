"""A logit bias on the keys of blocks encoded apart from what precedes them (APE-style, training free).

Every stored block was prefilled alone, right after the shared prefix. Assembled behind other blocks, its keys
still look as they did there, and a question over the assembled context attends to them differently from a
question over a text prefill of the same passages; on SmolLM2 it attends to them too much. As in Adaptive
Parallel Encoding (Yang et al., ICLR 2025), a constant added to the attention logits of those keys, for the
queries after the context (the question and the answer), brings kv mode's next-token distributions closer to
text mode's, with or without a recompute (docs/research/parallel-encoding-bias.md). The prefix and the first
block (encoded where it sits) get none. Deeper layers over-attend more: a bias that grows with depth (a
:class:`BlockBias` profile) corrects more.

The bias is a ``[batch, rows]`` tensor over the first cache rows (rows after it get 0), the same for every query (a
recompute's context tokens read the stale rows through it as the question does), handed to the model's forward as
the ``key_bias`` keyword, with an optional factor per layer (``[layers]``) or per layer and row (``[layers, rows]``:
a recompute leaves some rows exact at some layers) as ``key_bias_scale``; transformers passes keywords through to
the attention function, and the model attends with :data:`BIASED_SDPA`, sdpa that adds the layer's bias to the
mask. Without ``key_bias`` that function is sdpa itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BIASED_SDPA = "kvrag_sdpa"
KEY_BIAS = "key_bias"  # the forward keyword that carries the bias to the attention function
KEY_BIAS_SCALE = "key_bias_scale"  # the forward keyword of its factor per layer, ``[layers]`` or ``[layers, rows]``


@dataclass(frozen=True)
class BlockBias:
    """A block bias profile: ``base`` on the first layers, ``base * factor`` from each ``deeper`` step's first layer
    on (steps ``(first_layer, factor)`` in ascending order; none: the same bias on every layer)."""

    base: float
    deeper: tuple[tuple[int, float], ...] = ()

    def layer_factors(self, layers: int) -> list[float]:
        """The factor on ``base`` at each of ``layers`` layers."""
        factors = [1.0] * layers
        for first, factor in self.deeper:
            factors[first:] = [factor] * max(0, layers - first)
        return factors


# Tuned per model on held-out questions (docs/research/parallel-encoding-bias.md): a base value, doubled from
# the middle layers on. A model not listed gets none until it is measured.
MEASURED_BLOCK_BIAS: dict[str, BlockBias] = {"SmolLM2-135M-Instruct": BlockBias(-0.5, ((6, 1.5), (12, 2.0)))}


def measured_block_bias(model_name: str) -> BlockBias:
    """The bias profile measured for ``model_name``, else a bias of 0 (off)."""
    return MEASURED_BLOCK_BIAS.get(model_name, BlockBias(0.0))


def row_bias(rows: int, exact_rows: int, bias: float, device: torch.device) -> torch.Tensor | None:
    """``[rows]``: 0 on the first ``exact_rows`` cache rows (prefix and first block), ``bias`` on the rest; None when
    nothing would be biased."""
    if bias == 0.0 or exact_rows >= rows:
        return None
    out = torch.zeros(rows, device=device)
    out[exact_rows:] = bias
    return out


def causal_seen(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Bool ``[queries, keys]``: what each query sees when the queries are the last ``queries`` of ``keys`` rows
    (the causal mask a model skips building when it can attend with ``is_causal``)."""
    last = torch.arange(queries, device=device)[:, None] + keys - queries  # the last key each query sees
    return torch.arange(keys, device=device)[None, :] <= last


def biased_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                key_bias: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` as an additive float mask ``[batch, 1, queries, keys]`` with ``key_bias`` added.

    ``attention_mask``: bool (True attends), additive float, or None (causal, the queries being the last rows);
    ``key_bias``: ``[batch, rows]``, cut or zero-padded to the keys, the same for every query.
    """
    queries, keys = query.shape[2], key.shape[2]
    dtype, device = query.dtype, query.device
    low = torch.finfo(dtype).min  # not -inf: a padded query row that sees nothing must not turn into NaN
    if attention_mask is None:
        seen = causal_seen(queries, keys, device)
        base = torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill(~seen, low)[None, None]
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[..., :keys]
        base = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, low)
    else:
        base = attention_mask[..., :keys].to(dtype)
    bias = key_bias.to(dtype)[..., :keys]
    bias = torch.nn.functional.pad(bias, (0, keys - bias.shape[-1]))
    return base + bias[:, None, None, :]


def layer_mask(module: torch.nn.Module, attention_mask: torch.Tensor | None, query: torch.Tensor,
               key: torch.Tensor, key_bias: torch.Tensor | None, key_bias_scale: torch.Tensor | None
               ) -> torch.Tensor | None:
    """``attention_mask`` for the attention ``module``: with ``key_bias`` times the module's layer factor of
    ``key_bias_scale: [layers]`` or ``[layers, rows]`` (1 without) added (:func:`biased_mask`), unchanged without
    ``key_bias``."""
    if key_bias is None:
        return attention_mask
    if key_bias_scale is not None:
        layer: int = module.layer_idx  # type: ignore[assignment]
        key_bias = key_bias * key_bias_scale[layer]
    return biased_mask(attention_mask, query, key, key_bias)


def _biased_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, key_bias: torch.Tensor | None = None,
                 key_bias_scale: torch.Tensor | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """sdpa, with the layer's ``key_bias`` (when given) added to the mask."""
    attention_mask = layer_mask(module, attention_mask, query, key, key_bias, key_bias_scale)
    return masked_sdpa(module, query, key, value, attention_mask, **kwargs)


def masked_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, but over the grouped-query heads as they are when a mask is given
    (:func:`grouped_sdpa`); every attention function kvrag registers (biased, scoring, the kv rerank's) ends here."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    if attention_mask is not None and groups > 1 and query.shape[2] > 1 and not module.training and _plain(kwargs):
        return grouped_sdpa(query, key, value, attention_mask, kwargs.get("scaling")), None  # type: ignore[arg-type]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]


def _plain(kwargs: dict[str, object]) -> bool:
    """No attention feature :func:`grouped_sdpa` leaves out (softcap, a position bias, dropout)."""
    return kwargs.get("softcap") is None and kwargs.get("position_bias") is None and not kwargs.get("dropout")


def grouped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 scaling: float | None) -> torch.Tensor:
    """sdpa over grouped-query heads as they are (``enable_gqa``), the output ``[batch, tokens, heads, dim]``.

    transformers copies every key and value head once per query head of its group (``repeat_kv``) whenever a mask
    is given, and kv mode always gives one (the block bias): on SmolLM2 (3 query heads a key head) that copy of
    the whole context costs ~10% of a question's forward on the CPU (issue 33). A mask shared by the heads
    (``[batch, 1, queries, keys]``) needs no copy.
    """
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(BIASED_SDPA, _biased_sdpa)
AttentionMaskInterface.register(BIASED_SDPA, sdpa_mask)


def enable(model: PreTrainedModel) -> bool:
    """Make ``model`` attend with :data:`BIASED_SDPA` if it attends with sdpa (same results without a bias); True
    when it does now. Other implementations are left alone, and the bias cannot be applied to them."""
    configs = {id(c): c for c in (model.config, model.get_decoder().config)}.values()
    impls = {c._attn_implementation for c in configs}
    if impls <= {BIASED_SDPA}:
        return True
    if impls != {"sdpa"}:
        return False
    for config in configs:
        config._attn_implementation_internal = BIASED_SDPA
    return True
