"""KV rerank (issue 13): rank candidate blocks by how much attention the question pays them.

Each block keeps a *key summary* beside its KV: the pre-RoPE keys of a few attention heads, every
token, int8 with one scale per key. At search time the question alone is prefilled after the cached
prompt prefix, only up to the deepest chosen layer, and its pre-RoPE queries at those heads are
scored against the summaries of all N candidates at once: one softmax per question token and head
over the union of the candidates' keys (the attention the model would pay if they were its context),
the mass each block receives averaged over the question's tokens, z-scored over the candidates per
head, then averaged over heads.

Why these choices (the probes are in docs/research/retrieval.md):

- Heads, not layers: a handful of heads match the question's words against the passage's; averaging
  every head of every layer drowns them near chance.
- Every token, not centroids: the useful heads make sharp token matches that centroids blur. The
  summary stays small by keeping only the chosen heads: about 1% of the block's KV.
- Position-free (both pre-RoPE, relative offset 0): no worse than a common offset once fused with the
  other scores, and it needs no rotation.

Stored format (a catalog column, never unpickled)::

    b"KVKS" | u16 format version | u32 header length | header (UTF-8 JSON) | payload | sha256

The header names the model fingerprint, the (layer, kv head) pairs, the token count and head dim;
the payload is int8 keys then float16 scales, little-endian. A summary of another model or other
heads is stale (rebuilt, not an error); a damaged one raises :class:`CorruptBlock`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstore.errors import CorruptBlock, ValidationFailed
from kvstore.model.attention_bias import masked_sdpa
from kvstore.model.compat import with_cache
from kvstore.model.forward import StopForward, attention_implementation
from kvstore.model.runner import Runner
from kvstore.storage.catalog import BankRow, BlockRow
from kvstore.types import BlockKV

if TYPE_CHECKING:
    from kvstore.ports import Engine

log = logging.getLogger(__name__)

MAGIC = b"KVKS"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<4sHI")
_DIGEST = 32
CAPTURE_ATTENTION = "kvrag_query_capture"
FALLBACK_DEPTH = 0.6  # a model without the configured heads uses every head of the layer at this depth

Head = tuple[int, int]  # (layer, query head)


@dataclass(frozen=True)
class HeadPlan:
    """Which query heads score blocks, and the (layer, kv head) pairs whose keys a summary keeps."""

    heads: tuple[Head, ...]
    kv_pairs: tuple[Head, ...]
    pair_of_head: tuple[int, ...]  # index into kv_pairs for each of heads (grouped-query attention)

    @property
    def last_layer(self) -> int:
        return max(layer for layer, _ in self.heads)


def plan_heads(spec: str, num_layers: int, q_heads: int, kv_heads: int) -> HeadPlan:
    """Parse ``"17.3,18.6"`` (layer.query head); heads the model lacks are dropped, and when none is
    left every query head of the layer at ``FALLBACK_DEPTH`` of the depth is used."""
    heads: list[Head] = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            layer, head = (int(x) for x in item.split("."))
        except ValueError:
            raise ValidationFailed(f"kv rerank head {item!r} is not layer.head") from None
        if 0 <= layer < num_layers and 0 <= head < q_heads and (layer, head) not in heads:
            heads.append((layer, head))
    if not heads:
        layer = round(FALLBACK_DEPTH * (num_layers - 1))
        heads = [(layer, h) for h in range(q_heads)]
    group = q_heads // kv_heads  # query head h reads kv head h // group, as transformers' repeat_kv lays them out
    pairs = sorted({(layer, h // group) for layer, h in heads})
    return HeadPlan(heads=tuple(heads), kv_pairs=tuple(pairs),
                    pair_of_head=tuple(pairs.index((layer, h // group)) for layer, h in heads))


@dataclass
class KeySummary:
    """Keys of one block at the plan's kv pairs, pre-RoPE: ``keys [pairs, tokens, head_dim]`` float32."""

    fingerprint: str
    kv_pairs: tuple[Head, ...]
    keys: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[1])


def summarize(kv: BlockKV, plan: HeadPlan, fingerprint: str) -> KeySummary:
    """The summary of a block's KV (``kv.k [layers, kv_heads, tokens, head_dim]``, pre-RoPE)."""
    layers = torch.tensor([layer for layer, _ in plan.kv_pairs], device=kv.k.device)
    heads = torch.tensor([h for _, h in plan.kv_pairs], device=kv.k.device)
    return KeySummary(fingerprint=fingerprint, kv_pairs=plan.kv_pairs, keys=kv.k[layers, heads].float().cpu())


def encode_summary(summary: KeySummary) -> bytes:
    """Bytes of a summary: int8 keys with a float16 absmax scale per key, checksummed."""
    keys = summary.keys.float()  # [pairs, tokens, dim]
    scale = keys.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
    q = (keys / scale).round().clamp(-127, 127).to(torch.int8).numpy()
    pairs, tokens, dim = q.shape
    header = {"fingerprint": summary.fingerprint, "kv_pairs": [list(p) for p in summary.kv_pairs],
              "tokens": tokens, "head_dim": dim}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    payload = q.tobytes() + scale.squeeze(-1).numpy().astype("<f2").tobytes()
    body = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def decode_summary(data: bytes) -> KeySummary:
    """Parse and verify a stored summary; :class:`CorruptBlock` when it is damaged."""
    if len(data) < _PREAMBLE.size + _DIGEST:
        raise CorruptBlock("key summary is truncated")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    magic, version, head_len = _PREAMBLE.unpack_from(body)
    if magic != MAGIC:
        raise CorruptBlock("not a kvrag key summary (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"unsupported key summary format version {version}")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptBlock("key summary checksum mismatch")
    try:
        header = json.loads(body[_PREAMBLE.size:_PREAMBLE.size + head_len])
        pairs = tuple((int(a), int(b)) for a, b in header["kv_pairs"])
        tokens, dim, fingerprint = int(header["tokens"]), int(header["head_dim"]), str(header["fingerprint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptBlock(f"unreadable key summary header: {exc}") from None
    payload = body[_PREAMBLE.size + head_len:]
    n = len(pairs) * tokens * dim
    if len(payload) != n + 2 * len(pairs) * tokens:
        raise CorruptBlock("key summary payload does not match its header")
    q = np.frombuffer(payload, dtype=np.int8, count=n).reshape(len(pairs), tokens, dim)
    scale = np.frombuffer(payload, dtype="<f2", offset=n).reshape(len(pairs), tokens, 1)
    keys = torch.from_numpy(q.astype(np.float32) * scale.astype(np.float32))
    return KeySummary(fingerprint=fingerprint, kv_pairs=pairs, keys=keys)


# -- the question's queries -----------------------------------------------------------------------


_capture: ContextVar[tuple[dict[int, torch.Tensor], int] | None] = ContextVar("kvrag_query_capture", default=None)


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       **kwargs: object) -> tuple[torch.Tensor, None]:
    """sdpa attention that records each layer's post-RoPE ``query [1, q_heads, tokens, dim]``."""
    sink = _capture.get()
    if sink is not None:
        seen, last = sink
        layer = int(getattr(module, "layer_idx", len(seen)))
        seen[layer] = query[0].detach().float()
        if layer >= last:
            raise StopForward  # the deepest wanted layer: the rest of the model is not run
    kwargs.pop("softcap", None)
    return masked_sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@contextmanager
def _capturing(runner: Runner, last_layer: int) -> Iterator[dict[int, torch.Tensor]]:
    seen: dict[int, torch.Tensor] = {}
    token = _capture.set((seen, last_layer))
    try:
        with attention_implementation(runner, CAPTURE_ATTENTION):
            yield seen
    finally:
        _capture.reset(token)


@torch.inference_mode()
def question_queries(runner: Runner, question: str, plan: HeadPlan) -> torch.Tensor:
    """Pre-RoPE queries of the question's own tokens at the plan's heads: ``[heads, tokens, head_dim]``.

    The question is prefilled after the cached prompt prefix and ``question_prefix`` (as it will sit in
    the query), without passages and without the chat template's tail; the forward stops after the
    deepest chosen layer. Callers hold the model lock.
    """
    lead = runner.tokenize(runner.layout.question_prefix)
    words = runner.tokenize(question)
    if not words:
        raise ValidationFailed("query has no tokens")
    ids = lead + words
    p = len(runner.prefix_ids)
    device = runner.llm.device
    positions = torch.arange(p, p + len(ids), device=device)
    with _capturing(runner, plan.last_layer) as seen:
        try:
            runner.model(input_ids=torch.tensor([ids], device=device), position_ids=positions[None],
                         **with_cache(runner.model, runner.prefix_cache()), use_cache=True, logits_to_keep=1)
        except StopForward:
            pass
    # Every layer's slot, so that models with per-layer rotary parameters unrotate each layer with its own
    # (ModelRope indexes its layer groups by absolute layer); the layers not captured stay zero and unused.
    first = next(iter(seen.values()))
    post = torch.zeros(runner.num_layers, *first.shape, dtype=first.dtype, device=first.device)
    for layer, query in seen.items():
        post[layer] = query  # [q_heads, tokens, dim], post-RoPE
    pre = runner.rope.unrotate(post, positions)
    return torch.stack([pre[layer, head, len(lead):] for layer, head in plan.heads]).cpu()


# -- scoring --------------------------------------------------------------------------------------


def kv_scores(queries: torch.Tensor, summaries: Sequence[KeySummary], plan: HeadPlan) -> np.ndarray:
    """KV-utility of each candidate, shape ``[len(summaries)]``; higher means more attention.

    ``queries [heads, tokens, dim]`` from :func:`question_queries`. All candidates are scored in one
    batch: their keys are padded to the longest and masked.
    """
    n = len(summaries)
    if n == 0:
        return np.zeros(0)
    dim = queries.shape[-1]
    lengths = torch.tensor([s.tokens for s in summaries])
    padded = pad_sequence([s.keys.transpose(0, 1) for s in summaries], batch_first=True)  # [blocks, tokens, pairs, dim]
    longest = padded.shape[1]
    valid = torch.arange(longest)[None] < lengths[:, None]  # [blocks, tokens]
    per_head = padded[:, :, list(plan.pair_of_head)].transpose(1, 2)  # [blocks, heads, tokens, dim]
    logits = torch.einsum("htd,bhkd->htbk", queries.float(), per_head) * dim ** -0.5
    logits = logits.masked_fill(~valid[None, None], float("-inf"))
    heads, tokens = logits.shape[:2]
    # One softmax over every candidate's keys: the attention the question would pay them as its context.
    attention = logits.reshape(heads, tokens, -1).softmax(-1).reshape(heads, tokens, n, longest)
    mass = attention.sum(-1).mean(1)  # [heads, blocks]
    z = (mass - mass.mean(-1, keepdim=True)) / (mass.std(-1, keepdim=True, unbiased=False) + 1e-9)
    return z.mean(0).double().numpy()


# -- storage: the blocks.kv_summary column ---------------------------------------------------------


class KeySummaries:
    """Key summaries of one store's blocks: built with the block's KV, kept in ``blocks.kv_summary``,
    verified when read, and rebuilt from the block's KV when missing, stale or damaged."""

    def __init__(self, store: Engine) -> None:
        self.store = store
        runner = store.runner
        config = runner.model.config.get_text_config(decoder=True)
        self.plan = plan_heads(store.settings.kv_rerank_heads, runner.num_layers, config.num_attention_heads,
                               runner.kv_heads)

    def build(self, kv: BlockKV, fingerprint: str) -> bytes:
        """Stored bytes of a block's summary (written with the block whenever its KV is written)."""
        return encode_summary(summarize(kv, self.plan, fingerprint))

    def _usable(self, summary: KeySummary, bank: BankRow, block: BlockRow) -> bool:
        return (summary.fingerprint == bank.model_fingerprint and summary.kv_pairs == self.plan.kv_pairs
                and summary.tokens == block.token_count)

    def load(self, s: Session, bank: BankRow, blocks: Sequence[BlockRow]) -> list[KeySummary]:
        """Each block's summary; a missing or stale one (older rows, another model, other heads) is rebuilt,
        a damaged one is logged, counted in the integrity report and rebuilt, never used."""
        stored = dict(s.execute(select(BlockRow.id, BlockRow.kv_summary).where(
            BlockRow.id.in_([b.id for b in blocks]))).tuples().all())
        out: list[KeySummary] = []
        for block in blocks:
            data = stored.get(block.id)
            summary: KeySummary | None = None
            if data is not None:
                try:
                    summary = decode_summary(data)
                except CorruptBlock as exc:
                    log.error("bank %s block %d: %s; rebuilding the key summary", bank.name, block.id, exc.detail)
                    self.store.note(bank.name, "corrupt_summaries")
            if summary is None or not self._usable(summary, bank, block):
                summary = self.rebuild(s, bank, block)
            out.append(summary)
        return out

    def rebuild(self, s: Session, bank: BankRow, block: BlockRow) -> KeySummary:
        """Summarize the block's KV again (hot tier, blob or a prefill of its tokens) and store it."""
        summary = summarize(self.store.load_block(s, bank, block), self.plan, bank.model_fingerprint)
        s.execute(update(BlockRow).where(BlockRow.id == block.id).values(kv_summary=encode_summary(summary)))
        s.commit()
        self.store.note(bank.name, "rebuilt_summaries")
        return summary

    def scores(self, s: Session, bank: BankRow, question: str, blocks: Sequence[BlockRow]) -> np.ndarray:
        """KV-utility of each block for ``question``, shape ``[len(blocks)]``."""
        summaries = self.load(s, bank, blocks)
        with self.store.model_lock:
            queries = question_queries(self.store.runner, question, self.plan)
        return kv_scores(queries, summaries, self.plan)
