"""Questions of concurrent kv queries prefilled and decoded together.

A query whose context is assembled asks :class:`QuestionBatcher` for its answer. One waiting thread at a
time leads: it takes the model lock, then every request waiting by then (up to ``max_batch``), and runs
them as one batch. A request that finds the model free therefore runs at once, alone, on the single-query
path (no wait is added); requests that arrive while a batch runs wait and form the next batch.

A batch pads the contexts on the left into one cache (:meth:`Runner.assemble_batch`) and the questions on
the left too, so every row's next token is the last column; an attention mask hides the padding and each row
keeps its own RoPE positions (``position_ids``), so a row's answer is the one it gets alone, up to float
rounding. Rows finish independently (EOS or their own ``max_new_tokens``); a finished row rides along with a
pad token until the last one ends. Sliding-window models run alone: their window counts cache columns, and
a shorter question's pad columns would sit inside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache

from kvstore.model.compaction import batch_prefill_attention, prefill_attention
from kvstore.model.compat import with_cache
from kvstore.model.runner import Generation, Runner
from kvstore.model.text import TokenStream
from kvstore.types import BlockKV


@dataclass
class BatchRequest:
    """One query's share of a batch: its context's blocks (after the prefix) and its question."""

    blocks: Sequence[BlockKV]
    question_ids: Sequence[int]
    max_new_tokens: int
    on_token: Callable[[str], None] | None = None
    record: bool = False  # record the prefill's attention for the importance policies


@dataclass
class BatchAnswer:
    generation: Generation
    context_tokens: int
    # Reduces, when called after the answer, the attention the question paid each context token:
    # [context_tokens], or None when not recorded.
    votes: Callable[[], torch.Tensor | None]
    batch_size: int  # requests answered in the same batch, this one included


@dataclass
class _Slot:
    request: BatchRequest
    answer: BatchAnswer | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None


def has_sliding_window(runner: Runner) -> bool:
    """Whether any layer attends to a sliding window (counted in cache columns, which padding shifts)."""
    config = runner.model.config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return any(t != "full_attention" for t in types)
    # Without per-layer types, a configured window counts unless the config turns it off (Mistral has no switch).
    window = getattr(config, "sliding_window", None)
    return window is not None and getattr(config, "use_sliding_window", True) is not False


@torch.inference_mode()
def answer_alone(runner: Runner, request: BatchRequest) -> BatchAnswer:
    """The single-query path: assemble, prefill the question, decode (what a batch's rows must equal). The
    assembly leaves room for the question's and the answer's rows, so no forward copies the context again."""
    ctx = runner.assemble(request.blocks, room=len(request.question_ids) + max(0, request.max_new_tokens))
    context_tokens = ctx.context_tokens
    recorder = prefill_attention(runner, ctx) if request.record else nullcontext(lambda: None)
    with recorder as recorded:
        gen = runner.generate(ctx, request.question_ids, request.max_new_tokens, request.on_token)
    return BatchAnswer(gen, context_tokens, recorded, 1)


@dataclass
class BatchPrefill:
    """A batch after its questions' prefill: what decoding continues from."""

    logits: torch.Tensor  # [rows, vocab]: each row's next-token logits after its question
    mask: torch.Tensor  # [rows, columns] long: 1 for a real token
    cache: DynamicCache
    next_positions: list[int]  # per row: the position of its first generated token
    context_tokens: list[int]
    votes: list[Callable[[], torch.Tensor | None]]  # per row: BatchAnswer.votes
    seconds: float
    bias: dict[str, torch.Tensor]  # the forward keyword of the rows' logit bias (kvstore.model.attention_bias), or none


@torch.inference_mode()
def prefill_batch(runner: Runner, requests: Sequence[BatchRequest]) -> BatchPrefill:
    """Assemble every request's context into one padded cache and prefill all questions in one forward."""
    device = runner.llm.device
    t0 = time.perf_counter()
    batch = runner.assemble_batch([r.blocks for r in requests])
    rows = len(requests)
    q_width = max(len(r.question_ids) for r in requests)
    ids = torch.full((rows, q_width), runner.pad_id, dtype=torch.long, device=device)  # [rows, q_width]
    positions = torch.zeros(rows, q_width, dtype=torch.long, device=device)
    q_mask = torch.zeros(rows, q_width, dtype=torch.long, device=device)
    for row, r in enumerate(requests):
        q, first = len(r.question_ids), batch.next_positions[row]
        ids[row, q_width - q:] = torch.tensor(list(r.question_ids), dtype=torch.long)
        # A pad's position only has to be valid: its KV is masked and its logits are not read.
        positions[row] = first
        positions[row, q_width - q:] = torch.arange(first, first + q, device=device)
        q_mask[row, q_width - q:] = 1
    mask = torch.cat((batch.mask, q_mask), dim=1)  # [rows, width + q_width]
    recorder = batch_prefill_attention(runner) if any(r.record for r in requests) else nullcontext(None)
    bias = runner.key_bias_kwargs(batch.bias)
    with recorder as votes_of:
        out = runner.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           **with_cache(runner.model, batch.cache), use_cache=True, logits_to_keep=1, **bias)
    seconds = time.perf_counter() - t0
    votes: list[Callable[[], torch.Tensor | None]] = []
    for row, r in enumerate(requests):
        if votes_of is None or not r.record:
            votes.append(lambda: None)
            continue
        keys = mask[row].nonzero().squeeze(1)  # this row's real columns: prefix, context, question
        tokens = torch.arange(q_width - len(r.question_ids), q_width, device=device)
        votes.append(partial(votes_of, row, tokens, keys, batch.next_positions[row], batch.context_tokens[row]))
    return BatchPrefill(out.logits[:, -1], mask, batch.cache,
                        [p + len(r.question_ids) for p, r in zip(batch.next_positions, requests, strict=True)],
                        batch.context_tokens, votes, seconds, bias)


@torch.inference_mode()
def answer_batch(runner: Runner, requests: Sequence[BatchRequest]) -> list[BatchAnswer]:
    """Answer several requests in one padded batch; a batch of one takes the single-query path."""
    if len(requests) == 1:
        return [answer_alone(runner, requests[0])]
    prefill = prefill_batch(runner, requests)
    ttft = time.perf_counter()
    generations = _decode(runner, requests, prefill, ttft)
    return [BatchAnswer(gen, n, v, len(requests))
            for gen, n, v in zip(generations, prefill.context_tokens, prefill.votes, strict=True)]


def _decode(runner: Runner, requests: Sequence[BatchRequest], prefill: BatchPrefill, ttft: float) -> list[Generation]:
    """Greedy decoding of every row from the prefill's logits until each row is done."""
    device = runner.llm.device
    rows = len(requests)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    streams = [TokenStream(runner.tokenizer, r.on_token) for r in requests]
    finished: list[float | None] = [None] * rows
    logits, mask = prefill.logits, prefill.mask
    positions = torch.tensor(prefill.next_positions, dtype=torch.long, device=device)[:, None]  # [rows, 1]
    while True:
        chosen = logits.argmax(-1).tolist()
        step_ids = []
        for row, r in enumerate(requests):
            if finished[row] is None:
                nxt = int(chosen[row])
                if nxt in runner.stop_ids or len(tokens[row]) >= r.max_new_tokens:
                    finished[row] = time.perf_counter()
                else:
                    tokens[row].append(nxt)
                    streams[row].push(tokens[row])
                    if len(tokens[row]) >= r.max_new_tokens:  # alone, the row would not run another step
                        finished[row] = time.perf_counter()
            step_ids.append(tokens[row][-1] if finished[row] is None else runner.pad_id)
        if all(t is not None for t in finished):
            break
        mask = torch.cat((mask, mask.new_ones(rows, 1)), dim=1)
        out = runner.model(input_ids=torch.tensor(step_ids, device=device)[:, None], attention_mask=mask,
                           position_ids=positions, **with_cache(runner.model, prefill.cache), use_cache=True,
                           logits_to_keep=1, **prefill.bias)
        logits = out.logits[:, -1]
        positions = positions + 1
    prefill_ms = prefill.seconds * 1000
    return [Generation(token_ids=tokens[row], text=streams[row].finish(tokens[row]), prefill_ms=prefill_ms,
                       ttft_s=ttft, finished_s=finished[row] or ttft) for row in range(rows)]


@dataclass
class BatchStats:
    batches: int = 0  # model runs, a lone request included
    requests: int = 0
    largest: int = 0


class QuestionBatcher:
    """Collects the kv requests waiting for the model and answers them in batches (see the module docstring).

    ``while_waiting``: entered around a request's whole stay in the batcher, leading included. The server passes
    its worker's ``released`` (giving up the worker's turn), so the next request's retrieval and loading proceed
    meanwhile and it can join the next batch.
    """

    def __init__(self, runner: Runner, model_lock: threading.Lock, max_batch: int,
                 while_waiting: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        self.runner = runner
        self.model_lock = model_lock
        self.max_batch = max_batch
        self.enabled = max_batch > 1 and not has_sliding_window(runner)
        self.while_waiting = while_waiting
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._leading = False

    def answer(self, request: BatchRequest) -> BatchAnswer:
        """The request's answer, from a batch with whichever requests wait alongside it."""
        slot = _Slot(request)
        with self.while_waiting():
            with self._lead_when_free(slot) as leading:
                while leading and not slot.done:  # FIFO: more than a batch may wait ahead of this one
                    self._run_next_batch()
        if slot.error is not None:
            raise slot.error
        assert slot.answer is not None
        return slot.answer

    @contextmanager
    def _lead_when_free(self, slot: _Slot) -> Iterator[bool]:
        """Queue ``slot``; yields True once this thread leads, False once another thread has answered it."""
        with self._cond:
            self._pending.append(slot)
            while not slot.done and self._leading:
                self._cond.wait()
            leading = not slot.done
            self._leading = self._leading or leading
        try:
            yield leading
        finally:
            if leading:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()

    def _run_next_batch(self) -> None:
        with self.model_lock:
            # Taken once the model is free: everything that arrived during the last batch rides in this one.
            with self._cond:
                batch = self._pending[:self.max_batch]
                del self._pending[:len(batch)]
            try:
                answers = answer_batch(self.runner, [s.request for s in batch])
            except BaseException as exc:  # noqa: BLE001 - every request of the batch gets the failure
                for s in batch:
                    s.error = exc
            else:
                for s, a in zip(batch, answers, strict=True):
                    s.answer = a
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        with self._cond:
            self._cond.notify_all()
