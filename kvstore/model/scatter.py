"""A pass of the model's own forward over an assembled cache that rewrites only the rows of the tokens it runs.

Selective recompute (:mod:`kvstore.model.recompute`) runs a few chosen context tokens again, each at its true
position and attending to every context token before it. The cache handed to the forward (:class:`ScatterCache`)
writes their new K/V rows at the chosen indices and returns the whole layer, and an explicit 4D mask (one per
layer type, for models with sliding-window layers) gives each token the causal view of its position. So every
RoPE decoder transformers implements works without re-implementing its layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    sliding_window_causal_mask_function,
)

from kvstore.model.attention_bias import BIASED_SDPA
from kvstore.model.compat import with_cache
from kvstore.model.forward import StopForward, start_at
from kvstore.model.runner import Runner
from kvstore.types import Context


class _ScatterLayer(CacheLayerMixin):
    """One layer of assembled K/V; ``update`` writes the incoming rows at ``index`` and returns all rows."""

    is_sliding = False  # Masks are passed explicitly; the layer keeps every token.

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # [batch, kv_heads, tokens, head_dim], written in place
        self.index = index  # [selected] cache rows the forward's tokens own
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never needed: the layer is built initialized."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.index, key_states.to(self.dtype))
        self.values.index_copy_(2, self.index, value_states.to(self.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def get_seq_length(self) -> int:
        return int(self.keys.shape[2])

    def get_max_length(self) -> int:
        return -1


class ScatterCache(Cache):
    """The assembled cache seen through scatter layers; records the value deviation at ``probe_layer``."""

    def __init__(self, ctx: Context, index: torch.Tensor, probe_layer: int | None = None) -> None:
        super().__init__(layers=[_ScatterLayer(layer.keys, layer.values, index) for layer in ctx.cache.layers])
        self.probe_layer = probe_layer
        self.deviation: torch.Tensor | None = None  # [selected] squared value deviation at probe_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if layer_idx == self.probe_layer:
            stored = layer.values.index_select(2, layer.index).float()  # [1, kv_heads, selected, head_dim]
            self.deviation = (value_states.float() - stored).pow(2).sum(dim=(0, 1, 3))
        return layer.update(key_states, value_states)


def _mask_for(runner: Runner, window: int | None, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
    """A 4D mask ``[1, 1, queries, kv_length]`` in the model's attention format: query i sees cache rows
    ``<= positions[i]`` (within ``window`` of it for sliding-window layers). Cache row j holds position j."""
    config = runner.model.config.get_text_config(decoder=True)
    impl = config._attn_implementation
    if impl not in ("sdpa", "eager", BIASED_SDPA):
        raise ValueError(f"selective recompute needs an sdpa or eager model, not {impl!r}")
    base = causal_mask_function if window is None else sliding_window_causal_mask_function(window)

    def at_positions(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor,
                     kv_idx: torch.Tensor) -> torch.Tensor:
        return base(batch_idx, head_idx, positions[q_idx], kv_idx)

    dtype = next(runner.model.parameters()).dtype
    return ALL_MASK_ATTENTION_FUNCTIONS[impl](
        batch_size=1, q_length=int(positions.shape[0]), kv_length=kv_length, mask_function=at_positions,
        allow_is_causal_skip=False, dtype=dtype, device=positions.device, config=config)


def _masks(runner: Runner, positions: torch.Tensor, kv_length: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """One mask per attention layer type: a tensor when all layers share one, else the mapping that hybrid
    models (Gemma 3, Qwen2 with sliding layers) accept in place of the masks they would build."""
    config = runner.model.config.get_text_config(decoder=True)
    layer_types: list[str] | None = getattr(config, "layer_types", None)
    if not layer_types:
        return _mask_for(runner, getattr(config, "sliding_window", None), positions, kv_length)
    windows: dict[str, int | None] = {}
    for kind in set(layer_types[: runner.num_layers]):
        if kind == "full_attention":
            windows[kind] = None
        elif kind == "sliding_attention":
            windows[kind] = config.sliding_window
        else:
            raise ValueError(f"selective recompute does not support {kind!r} layers")
    if len(windows) == 1:
        return _mask_for(runner, next(iter(windows.values())), positions, kv_length)
    return {kind: _mask_for(runner, window, positions, kv_length) for kind, window in windows.items()}


def run_rows(runner: Runner, cache: ScatterCache, positions: torch.Tensor, inputs: torch.Tensor,
             start: int = 0, logits: bool = False, biased: Context | None = None) -> torch.Tensor | None:
    """Run the model over ``cache`` at ``positions: [tokens]``: from token ids ``inputs: [tokens]`` through every
    layer, or, with ``start > 0``, from ``inputs: [tokens, hidden_size]``, the hidden states entering layer
    ``start``. With ``logits``, the next-token logits ``[vocab]`` after the last of the tokens once the forward
    reaches the end (None when it was stopped); without, the LM head never runs. With ``biased``, every query reads
    the cache through that context's block bias (:meth:`Runner.bias_kwargs`: none on the rows it marks exact)."""
    kv_length = cache.layers[0].get_seq_length()
    given = {"input_ids": inputs[None]} if start == 0 else {"inputs_embeds": inputs[None]}
    run: Callable[..., object] = runner.model if logits else runner.model.get_decoder()
    extra: dict[str, object] = {"logits_to_keep": 1} if logits else {}
    if biased is not None:
        extra.update(runner.bias_kwargs(biased))
    with start_at(runner, start):
        try:
            out = run(**given, position_ids=positions[None], **with_cache(run, cache), use_cache=True,
                      attention_mask=_masks(runner, positions, kv_length), **extra)
        except StopForward:
            return None
    return out.logits[0, -1].float() if logits else None  # type: ignore[attr-defined]
