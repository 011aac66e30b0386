"""Prefill blocks after the shared prefix, assemble stored KV, prefill the question, generate.

The same runner serves kv mode and text mode (the baseline), so both are measured alike: text mode
reuses the cached prefix KV, as a serving engine with prefix caching would, and prefills the
retrieved blocks' tokens plus the question in one forward pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvstore.model import attention_bias
from kvstore.model.compat import with_cache
from kvstore.model.device import Assembled, PendingLayer, ResidentBlocks, assemble_layers
from kvstore.model.loader import LoadedModel
from kvstore.model.rope import ModelRope
from kvstore.model.text import TokenStream, prompt_layout
from kvstore.types import BlockKV, Context


@dataclass
class BatchContext:
    """Several contexts in one padded cache, a row each, right-aligned: ``[pad | prefix | blocks]``."""

    cache: DynamicCache  # per layer [rows, kv_heads, width, head_dim]
    mask: torch.Tensor  # [rows, width] long: 1 for a real token, 0 for padding
    next_positions: list[int]  # per row: the position of its next token
    context_tokens: list[int]
    bias: torch.Tensor | None = None  # [rows, width] logit bias per cache column for later queries (attention_bias)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    prefill_ms: float
    ttft_s: float  # perf_counter timestamp of the first generated token
    finished_s: float


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads if threads > 0 else max(1, os.cpu_count() or 1))


class Runner:
    """Model-side operations of kvrag. Not thread-safe: callers serialize model work."""

    def __init__(self, llm: LoadedModel, system_prompt: str, device_cache_bytes: int = 0,
                 block_bias: float | attention_bias.BlockBias = 0.0) -> None:
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.rope = ModelRope(self.model)
        self.layout = prompt_layout(self.tokenizer, system_prompt)
        config = self.model.config.get_text_config(decoder=True)
        self.num_layers: int = config.num_hidden_layers
        self.kv_heads: int = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eos = self.tokenizer.eos_token_id
        self.stop_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if gen_eos is not None:
            self.stop_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (next(iter(self.stop_ids)) if self.stop_ids else 0)
        self.prefix_ids: list[int] = self.tokenize(self.layout.prefix, add_special=True)
        self.prefix_kv: tuple[torch.Tensor, torch.Tensor] = self._prefill_prefix()
        device = self.llm.device
        # CUDA assembles layer by layer on a copy stream that runs ahead of the question's prefill; the CPU
        # has no second engine to overlap with, so it keeps the one-pass assembly.
        self.layered = device.type == "cuda"
        self.resident = ResidentBlocks(device_cache_bytes)  # filled by assemble_layered only
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._group_of = {layer: g for g, group in enumerate(self.rope.groups) for layer in group.layers}
        # The questions' logit bias on the keys of every assembled block but the first (kvstore.model.attention_bias);
        # the model must attend with the biased sdpa for it, else it stays off. A context's rows carry the base
        # bias; the profile's factor per layer rides along every forward that applies it.
        profile = block_bias if isinstance(block_bias, attention_bias.BlockBias) else attention_bias.BlockBias(
            block_bias)
        self.block_bias = profile.base if profile.base and attention_bias.enable(self.model) else 0.0
        self.bias_scale: torch.Tensor | None = (  # [layers]
            torch.tensor(profile.layer_factors(self.num_layers), device=self.llm.device)
            if self.block_bias and profile.deeper else None)

    # -- tokens -----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def question_ids(self, question: str) -> list[int]:
        layout = self.layout
        return self.tokenize(layout.question_prefix + question + layout.question_suffix)

    @property
    def bytes_per_token_fp16(self) -> int:
        """Size of one token's K and V in fp16: the 'raw' size compression is measured against."""
        return self.num_layers * self.kv_heads * self.head_dim * 2 * 2

    # -- prefill ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def _prefill_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        cache = DynamicCache()
        ids = torch.tensor([self.prefix_ids], device=self.llm.device)
        pos = torch.arange(len(self.prefix_ids), device=self.llm.device)[None]
        self.model(input_ids=ids, position_ids=pos, **with_cache(self.model, cache), use_cache=True, logits_to_keep=1)
        k = torch.stack([cache.layers[i].keys[0] for i in range(self.num_layers)])
        v = torch.stack([cache.layers[i].values[0] for i in range(self.num_layers)])
        return k, v  # post-RoPE, [layers, kv_heads, prefix, head_dim]

    def cache_from(self, k: torch.Tensor, v: torch.Tensor, owned: bool = False,
                   ready: Sequence[torch.cuda.Event | None] | None = None, rows: int | None = None) -> DynamicCache:
        """A full-attention DynamicCache from ``k, v: [layers, batch, heads, tokens, dim]``.

        No config is given on purpose: transformers would make sliding-window layers keep only the
        last window, and kvrag needs every token of a block. The model's own masks still apply the
        window when attending. ``owned``: the caller gives up ``k, v`` (a fresh assembly buffer), so the
        layers use them as they are instead of copying; ``ready``: per layer, the event its copy records;
        ``rows`` (owned only): the filled rows, the rest is room for the rows later forwards append
        (:class:`kvstore.model.device.PendingLayer`).
        """
        cache = DynamicCache()
        if owned:
            events = ready or [None] * self.num_layers
            cache.layers.extend(PendingLayer(k[layer], v[layer], events[layer], rows)
                                for layer in range(self.num_layers))
            return cache
        for layer in range(self.num_layers):
            cache.update(k[layer], v[layer], layer)
        return cache

    def prefix_cache(self, batch: int = 1) -> DynamicCache:
        k, v = self.prefix_kv
        return self.cache_from(k[:, None].expand(-1, batch, -1, -1, -1), v[:, None].expand(-1, batch, -1, -1, -1))

    @torch.inference_mode()
    def encode(self, blocks: Sequence[Sequence[int]], batch_size: int = 8) -> list[BlockKV]:
        """Prefill each block (token ids) after the shared prefix, batched; keys come back pre-RoPE."""
        out: list[BlockKV] = []
        p = len(self.prefix_ids)
        device = self.llm.device
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            width = max(len(b) for b in batch)
            # Right padding is safe without a mask: causal attention never lets a real token see a
            # later pad, and pads' own KV is dropped below.
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long, device=device)
            for row, b in enumerate(batch):
                ids[row, : len(b)] = torch.tensor(list(b), dtype=torch.long)
            positions = torch.arange(p, p + width, device=device)
            cache = self.prefix_cache(len(batch))
            self.model(input_ids=ids, position_ids=positions[None].expand(len(batch), -1),
                       **with_cache(self.model, cache), use_cache=True, logits_to_keep=1)
            k_all = torch.stack([cache.layers[i].keys[:, :, p:] for i in range(self.num_layers)], dim=1)
            v_all = torch.stack([cache.layers[i].values[:, :, p:] for i in range(self.num_layers)], dim=1)
            # k_all, v_all: [batch, layers, kv_heads, width, head_dim]
            for row, b in enumerate(batch):
                n = len(b)
                k_pre = self.rope.unrotate(k_all[row, :, :, :n].float(), positions[:n])
                out.append(BlockKV(k=k_pre.contiguous(), v=v_all[row, :, :, :n].float().contiguous()))
        return out

    # -- assembly ---------------------------------------------------------------------------------

    def assemble(self, blocks: Sequence[BlockKV], room: int = 0) -> Context:
        """Concatenate blocks after the prefix, each block's keys rotated to its new offset. ``room``: rows left
        free after them for what later forwards append (the question, the answer), written there in place."""
        pk, pv = self.prefix_kv  # [layers, heads, prefix, dim], post-RoPE
        p = pk.shape[2]
        if not blocks and room <= 0:
            return Context(self.prefix_cache(), p, 0)
        if self.layered and blocks:
            return self.assemble_layered(blocks)
        n = sum(b.tokens for b in blocks)
        layers, heads, _, dim = pk.shape
        # One allocation per K and V; the blocks are copied in once, keys rotated in place of the copy.
        k = torch.empty(layers, 1, heads, p + n + room, dim, dtype=pk.dtype, device=pk.device)
        v = torch.empty_like(k)
        k[:, 0, :, :p], v[:, 0, :, :p] = pk, pv
        offset = p
        for b in blocks:
            k[:, 0, :, offset:offset + b.tokens] = b.k
            v[:, 0, :, offset:offset + b.tokens] = b.v
            offset += b.tokens
        if n:
            self.rope.place_inplace(k[:, 0, :, p:p + n], torch.arange(p, p + n, device=pk.device))
        return Context(self.cache_from(k, v, owned=True, rows=p + n), p + n, n, self._bias(p, blocks))

    def assemble_layered(self, blocks: Sequence[BlockKV]) -> Context:
        """:meth:`assemble` layer by layer (the CUDA path; callable on CPU, where it runs in order): blocks
        resident on the GPU are not copied again, host blocks are copied on the copy stream, and each layer's
        keys are re-rotated in one op over all blocks while earlier layers already serve the prefill."""
        pk, pv = self.prefix_kv
        p = pk.shape[2]
        n = sum(b.tokens for b in blocks)
        positions = torch.arange(p, p + n, device=pk.device)
        tables = [self.rope.cos_sin(group, positions) for group in self.rope.groups]  # per group: [n, rot]

        def rotate(layer: int, k: torch.Tensor) -> None:
            cos, sin = tables[self._group_of[layer]]
            self.rope.rotate_inplace(k, cos, sin)

        built: Assembled = assemble_layers(pk, pv, [(b.key, b.k, b.v) for b in blocks], rotate, self.resident,
                                           self._copy_stream)
        return Context(self.cache_from(built.k, built.v, owned=True, ready=built.ready), p + n, n,
                       self._bias(p, blocks))

    def assemble_batch(self, rows: Sequence[Sequence[BlockKV]]) -> BatchContext:
        """:meth:`assemble` for several contexts at once, in one cache padded on the left (a shorter context's
        pad columns come first, so every row's next token is the last column): each row's keys are rotated
        to the positions it has alone, which the padding does not shift."""
        pk, pv = self.prefix_kv  # [layers, heads, prefix, dim], post-RoPE
        layers, heads, p, dim = pk.shape
        lengths = [sum(b.tokens for b in blocks) for blocks in rows]
        width = p + max(lengths)
        # Zeros, not empty: a pad's key meets the queries before the mask hides it, and garbage could be NaN.
        k = pk.new_zeros(layers, len(rows), heads, width, dim)
        v = torch.zeros_like(k)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=pk.device)
        bias: torch.Tensor | None = None
        for row, (blocks, n) in enumerate(zip(rows, lengths, strict=True)):
            start = width - p - n
            k[:, row, :, start:start + p], v[:, row, :, start:start + p] = pk, pv
            offset = start + p
            for b in blocks:
                k[:, row, :, offset:offset + b.tokens] = b.k
                v[:, row, :, offset:offset + b.tokens] = b.v
                offset += b.tokens
            self.rope.place_inplace(k[:, row, :, start + p:], torch.arange(p, p + n, device=pk.device))
            mask[row, start:] = 1
            row_bias = self._bias(p, blocks)
            if row_bias is not None:
                bias = bias if bias is not None else torch.zeros(len(rows), width, device=pk.device)
                bias[row, start:] = row_bias
        return BatchContext(self.cache_from(k, v, owned=True), mask, [p + n for n in lengths], lengths, bias)

    def _bias(self, prefix: int, blocks: Sequence[BlockKV]) -> torch.Tensor | None:
        """``[prefix + tokens]`` logit bias of an assembly of ``blocks``: the runner's on every block but the first."""
        rows = prefix + sum(b.tokens for b in blocks)
        exact = prefix + (blocks[0].tokens if blocks else 0)
        return attention_bias.row_bias(rows, exact, self.block_bias, self.prefix_kv[0].device)

    def bias_kwargs(self, ctx: Context) -> dict[str, torch.Tensor]:
        """The forward keywords that give queries after ``ctx`` its bias (``key_bias: [1, rows]``), or none."""
        return self.key_bias_kwargs(ctx.bias[None] if ctx.bias is not None else None, ctx.exact)

    def key_bias_kwargs(self, key_bias: torch.Tensor | None, exact: torch.Tensor | None = None
                        ) -> dict[str, torch.Tensor]:
        """The forward keywords that apply ``key_bias: [batch, rows]`` (:func:`attention_bias.biased_mask`) with
        this runner's factor per layer, and none on the rows ``exact: [layers, rows]`` marks at a layer (the factor
        then goes per layer and row); none at all without a bias."""
        if key_bias is None:
            return {}
        kwargs = {attention_bias.KEY_BIAS: key_bias}
        scale = self.bias_scale  # [layers]
        if exact is not None:
            per_layer = scale if scale is not None else torch.ones(self.num_layers, device=exact.device)
            scale = per_layer[:, None] * (~exact).to(per_layer.dtype)  # [layers, rows]
        if scale is not None:
            kwargs[attention_bias.KEY_BIAS_SCALE] = scale
        return kwargs

    def context_at(self, kv: BlockKV, positions: torch.Tensor, next_position: int) -> Context:
        """The prefix, then ``kv`` with its pre-RoPE keys rotated to ``positions: [tokens]``.

        Positions may have gaps (pruned or compacted tokens): the remaining tokens keep the RoPE distances
        they were computed with. The next token goes at ``next_position``.
        """
        pk, pv = self.prefix_kv  # [layers, heads, prefix, dim], post-RoPE
        k = torch.cat((pk, self.rope.rotate(kv.k.to(pk), positions.to(pk.device))), dim=2)
        v = torch.cat((pv, kv.v.to(pv)), dim=2)
        return Context(self.cache_from(k[:, None], v[:, None]), next_position, kv.tokens)

    @torch.inference_mode()
    def extend(self, ctx: Context, input_ids: Sequence[int]) -> BlockKV:
        """Prefill ``input_ids`` after ``ctx`` at positions continuing from ``next_position``; their KV, keys
        pre-RoPE. ``ctx`` grows by these tokens (cache rows, ``next_position`` and ``context_tokens``)."""
        device = self.llm.device
        n = len(input_ids)
        rows = ctx.cache.get_seq_length()
        positions = torch.arange(ctx.next_position, ctx.next_position + n, device=device)
        self.model(input_ids=torch.tensor([list(input_ids)], device=device), position_ids=positions[None],
                   **with_cache(self.model, ctx.cache), use_cache=True, logits_to_keep=1, **self.bias_kwargs(ctx))
        k = torch.stack([ctx.cache.layers[i].keys[0, :, rows:] for i in range(self.num_layers)])
        v = torch.stack([ctx.cache.layers[i].values[0, :, rows:] for i in range(self.num_layers)])
        ctx.next_position += n
        ctx.context_tokens += n
        return BlockKV(k=self.rope.unrotate(k.float(), positions).contiguous(), v=v.float().contiguous())

    def text_context(self, room: int = 0) -> Context:
        """The cached prefix alone: text mode prefills the block tokens with the question. ``room``: as in
        :meth:`assemble`."""
        return self.assemble([], room)

    # -- question ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, ctx: Context, input_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits ``[len(input_ids), vocab]`` after ``ctx`` (fidelity measurements)."""
        device = self.llm.device
        ids = torch.tensor([list(input_ids)], device=device)
        pos = torch.arange(ctx.next_position, ctx.next_position + len(input_ids), device=device)[None]
        out = self.model(input_ids=ids, position_ids=pos, **with_cache(self.model, ctx.cache), use_cache=True,
                         **self.bias_kwargs(ctx))
        return out.logits[0].float()

    @torch.inference_mode()
    def prefill(self, ctx: Context, input_ids: Sequence[int]) -> torch.Tensor:
        """Prefill ``input_ids`` after ``ctx`` (its cache grows by their rows; ``next_position`` stays): the
        next-token logits ``[vocab]`` after the last of them."""
        device = self.llm.device
        ids = torch.tensor([list(input_ids)], device=device)
        positions = torch.arange(ctx.next_position, ctx.next_position + len(input_ids), device=device)[None]
        out = self.model(input_ids=ids, position_ids=positions, **with_cache(self.model, ctx.cache), use_cache=True,
                         logits_to_keep=1, **self.bias_kwargs(ctx))
        return out.logits[0, -1]

    @torch.inference_mode()
    def generate(
        self,
        ctx: Context,
        input_ids: Sequence[int],
        max_new_tokens: int,
        on_token: Callable[[str], None] | None = None,
    ) -> Generation:
        """Greedy decoding after ``ctx``: prefill ``input_ids``, then one token at a time until EOS."""
        t0 = time.perf_counter()
        if max_new_tokens <= 0:
            return Generation(token_ids=[], text="", prefill_ms=0.0, ttft_s=t0, finished_s=time.perf_counter())
        logits = self.prefill(ctx, input_ids)
        return self.decode(ctx, logits, ctx.next_position + len(input_ids), max_new_tokens, on_token, started=t0)

    @torch.inference_mode()
    def decode(
        self,
        ctx: Context,
        logits: torch.Tensor,
        position: int,
        max_new_tokens: int,
        on_token: Callable[[str], None] | None = None,
        started: float | None = None,
    ) -> Generation:
        """Greedy decoding from the prefilled ``ctx``: ``logits: [vocab]`` predict the first token, which goes in at
        ``position``, and so on, one token at a time, until EOS or ``max_new_tokens``. The first token's time
        is the time to first token; ``started`` (default: now) is when its prefill began."""
        device = self.llm.device
        t0 = time.perf_counter() if started is None else started
        ttft = time.perf_counter()
        tokens: list[int] = []
        stream = TokenStream(self.tokenizer, on_token)
        for step in range(max(0, max_new_tokens)):
            if step > 0:
                out = self.model(input_ids=torch.tensor([[tokens[-1]]], device=device),
                                 position_ids=torch.tensor([[position]], device=device),
                                 **with_cache(self.model, ctx.cache), use_cache=True, logits_to_keep=1,
                                 **self.bias_kwargs(ctx))
                logits = out.logits[0, -1]
                position += 1
            nxt = int(logits.argmax())
            if nxt in self.stop_ids:
                break
            tokens.append(nxt)
            stream.push(tokens)
        text = stream.finish(tokens)
        return Generation(token_ids=tokens, text=text, prefill_ms=(ttft - t0) * 1000, ttft_s=ttft,
                          finished_s=time.perf_counter())
