"""Parts of the model's own forward: another attention function for a while, stop before a layer, start at one.

kvrag reads attention (compaction, importance, the KV rerank's queries) and recomputes some tokens' KV
(selective recompute) through the model's forward, never a copy of its layers, so every decoder transformers
implements works. Often only the first layers are needed: the forward is ended by raising
:class:`StopForward` once the wanted layer is done, and a later forward can start from the hidden states
where the first one stopped instead of from the token embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from kvstore.model.runner import Runner


class StopForward(Exception):
    """Raised inside a forward once what it was run for is known: the layers after that point are not run."""


def _decoder_layers(runner: Runner) -> Sequence[torch.nn.Module]:
    layers: Sequence[torch.nn.Module] = runner.model.get_decoder().layers
    return layers


@contextmanager
def attention_implementation(runner: Runner, name: str) -> Iterator[None]:
    """Every layer of ``runner``'s model attends with the registered attention function ``name`` in the block."""
    configs = {id(c): c for c in (runner.model.config, runner.model.get_decoder().config)}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs]
    for c, _ in saved:
        c._attn_implementation_internal = name
    try:
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl


@contextmanager
def stop_before(runner: Runner, layer: int) -> Iterator[list[torch.Tensor]]:
    """A forward run in the block raises :class:`StopForward` on entering decoder layer ``layer`` (the caller
    catches it); the yielded list then holds that layer's input, ``hidden [batch, tokens, hidden_size]``.
    A ``layer`` past the last one stops nothing."""
    entered: list[torch.Tensor] = []
    layers = _decoder_layers(runner)
    if layer >= min(len(layers), runner.num_layers):
        yield entered
        return

    def stop(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        assert isinstance(hidden, torch.Tensor)
        entered.append(hidden)
        raise StopForward

    handle = layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        yield entered
    finally:
        handle.remove()


def _pass_through(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return hidden_states


@contextmanager
def start_at(runner: Runner, layer: int) -> Iterator[None]:
    """Decoder layers before ``layer`` hand their input on unchanged in the block: a forward given the hidden
    states entering ``layer`` as ``inputs_embeds`` (from :func:`stop_before`) runs only ``layer`` and after.
    The skipped layers write no KV."""
    skipped = list(_decoder_layers(runner))[:layer]
    for module in skipped:
        # An instance attribute shadows the class's forward for this module only; deleting it restores it.
        module.forward = _pass_through  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in skipped:
            del module.forward
