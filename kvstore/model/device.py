"""Where the query path's KV lives on a CUDA worker, and how it reaches the GPU.

A CPU worker uses none of this beyond :class:`PendingLayer` (a cache layer over tensors it already owns,
so assembly hands its buffers to the model without another copy). On CUDA:

- the hot tier keeps decoded blocks in *pinned* host memory (:func:`pinned`), so the GPU copies them by
  DMA, asynchronously, at the bus's full rate;
- :class:`ResidentBlocks` keeps recently used blocks on the GPU itself (pre-RoPE, the model's dtype),
  so a block already there is never copied again;
- :func:`assemble_layers` fills the context's K/V layer by layer on a separate copy stream and records
  one event per layer; the model's forward waits on layer l's event only when it reaches layer l
  (:class:`PendingLayer`), so layer l+1's copy overlaps layer l of the question prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from kvstore.lru import ByteBudgetLRU


@dataclass
class ResidentKV:
    """A block's pre-RoPE KV on the GPU: ``k, v: [layers, kv_heads, tokens, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class ResidentBlocks(ByteBudgetLRU[ResidentKV]):
    """Blocks kept on the GPU under a byte budget, least recently used out first, keyed like the hot tier.

    ``hits`` are blocks served without a host-to-device copy; ``copies``/``copied_bytes`` those copied."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self.copies = 0
        self.copied_bytes = 0

    def lookup(self, key: str | None) -> ResidentKV | None:
        """The resident block under ``key`` (None for a block with no cache key, which is never resident)."""
        return None if key is None else self.get(key)

    def keep(self, key: str | None, item: ResidentKV) -> None:
        """Keep ``item`` resident under ``key`` (a block with no cache key is not kept)."""
        if key is not None:
            self.put(key, item)


def pinned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in page-locked host memory in ``dtype`` (what a non-blocking host-to-device copy needs), copied
    once: straight from the GPU or the pageable tensor into the pinned buffer. Needs CUDA."""
    if t.device.type == "cpu" and t.dtype == dtype and t.is_pinned():
        return t
    out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    out.copy_(t.detach())
    return out


class PendingLayer(DynamicLayer):
    """A full-attention cache layer over K/V the caller owns (no copy); with ``ready``, the first read of
    its keys or values makes the current CUDA stream wait for the copy stream's event of this layer.

    ``rows``: how many leading rows of ``keys, values: [batch, kv_heads, capacity, head_dim]`` are filled (default:
    all). The rows after them are room: the question's and the answer's rows are written there in place instead of
    concatenated onto a copy of the whole context at every forward (issue 33: ~5 ms of a ~88 ms question forward on
    SmolLM2, same logits). Room is used only while the layer's rows are still the ones it appended itself: once
    anything else sets its keys or values (cut back, compacted, reordered) it appends by concatenation as
    transformers' layer does, so no tensor handed out earlier ever sees a row change under it.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, ready: torch.cuda.Event | None = None,
                 rows: int | None = None) -> None:
        self._ready = ready
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        filled = int(keys.shape[-2]) if rows is None else rows
        self._room: tuple[torch.Tensor, torch.Tensor] | None = (keys, values) if filled < keys.shape[-2] else None
        self._keys, self._values = keys[..., :filled, :], values[..., :filled, :]  # [batch, kv_heads, rows, head_dim]
        self.is_initialized = True

    def _wait(self) -> None:
        if self._ready is not None:
            # Stream-ordered: the host does not block, the GPU's compute stream waits for this layer's copy.
            torch.cuda.current_stream(self._keys.device).wait_event(self._ready)
            self._ready = None

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor:
        self._wait()
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        self._room = None  # set from outside: from now on rows are appended by concatenation
        self._keys = value

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor:
        self._wait()
        return self._values

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        self._room = None
        self._values = value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states, value_states: [batch, kv_heads, new, head_dim]``: into the room when it holds them,
        else as transformers does; the layer's keys and values after it."""
        rows, new = int(self._keys.shape[-2]), int(key_states.shape[-2])
        if self._room is None or rows + new > self._room[0].shape[-2]:
            self._room = None  # full: the next rows go to a fresh tensor, which no earlier reader holds
            return super().update(key_states, value_states, *args, **kwargs)
        self._wait()
        room_k, room_v = self._room
        room_k[..., rows:rows + new, :] = key_states
        room_v[..., rows:rows + new, :] = value_states
        self._keys, self._values = room_k[..., :rows + new, :], room_v[..., :rows + new, :]
        return self._keys, self._values

    def get_seq_length(self) -> int:
        # Mask construction asks before layer 0 runs: the shape is known without waiting for any copy.
        return 0 if self._keys is None else int(self._keys.shape[-2])


Rotate = Callable[[int, torch.Tensor], None]  # (layer, keys [heads, tokens, dim]) rotated in place


@dataclass
class Assembled:
    """Context K/V ``[layers, 1, kv_heads, tokens, head_dim]`` and, on CUDA, each layer's ready event."""

    k: torch.Tensor
    v: torch.Tensor
    ready: list[torch.cuda.Event | None]


def assemble_layers(prefix_k: torch.Tensor, prefix_v: torch.Tensor, blocks: Sequence[tuple[str | None, torch.Tensor,
                    torch.Tensor]], rotate: Rotate, resident: ResidentBlocks, stream: torch.cuda.Stream | None
                    ) -> Assembled:
    """Prefix (post-RoPE) then the blocks (pre-RoPE, re-rotated to their new offsets), layer by layer.

    ``blocks`` are ``(key, k, v)`` with ``k, v: [layers, kv_heads, tokens, head_dim]`` on the host (pinned) or
    on the device. A block found in ``resident`` under its key is taken from there; a host block is copied
    once into a new resident entry (layer by layer, so the first layers are ready first) and kept. Each
    layer's block keys are re-rotated in one batched op over all blocks. With a ``stream`` the work runs on
    it and every layer records an event; without one (CPU) it runs in order on the current stream.
    """
    layers, heads, p, dim = prefix_k.shape
    device, dtype = prefix_k.device, prefix_k.dtype
    n = sum(int(k.shape[2]) for _, k, _ in blocks)
    k_out = torch.empty(layers, 1, heads, p + n, dim, dtype=dtype, device=device)
    v_out = torch.empty_like(k_out)
    ready: list[torch.cuda.Event | None] = [None] * layers
    if stream is not None:
        # The copy stream must see the buffers' allocation; the allocator must not hand their memory to
        # another tensor while the copy stream still writes them.
        stream.wait_stream(torch.cuda.current_stream(device))
        k_out.record_stream(stream)
        v_out.record_stream(stream)
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        sources: list[tuple[ResidentKV, ResidentKV | None]] = []  # (where to read, host block to copy in)
        for key, k, v in blocks:
            found = resident.lookup(key)
            if found is not None:
                sources.append((found, None))
            elif k.device == device:
                item = ResidentKV(k.to(dtype), v.to(dtype))
                resident.keep(key, item)
                sources.append((item, None))
            else:
                item = ResidentKV(torch.empty(k.shape, dtype=dtype, device=device),
                                  torch.empty(v.shape, dtype=dtype, device=device))
                resident.copies += 1
                resident.copied_bytes += item.nbytes
                sources.append((item, ResidentKV(k, v)))
        for layer in range(layers):
            k_out[layer, 0, :, :p] = prefix_k[layer]
            v_out[layer, 0, :, :p] = prefix_v[layer]
            offset = p
            for item, host in sources:
                if host is not None:
                    item.k[layer].copy_(host.k[layer], non_blocking=True)
                    item.v[layer].copy_(host.v[layer], non_blocking=True)
                tokens = int(item.k.shape[2])
                k_out[layer, 0, :, offset:offset + tokens] = item.k[layer]
                v_out[layer, 0, :, offset:offset + tokens] = item.v[layer]
                offset += tokens
            if n:
                rotate(layer, k_out[layer, 0, :, p:])
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                ready[layer] = event
    for (key, _, _), (item, host) in zip(blocks, sources, strict=True):
        if host is not None:
            resident.keep(key, item)
    return Assembled(k_out, v_out, ready)


def h2d_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured pinned host-to-device copy rate in bytes/s (best of ``repeats``); CUDA only."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return nbytes / best
