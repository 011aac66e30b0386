"""Measure the error costs the water-filled codec presets (``wf*``) allocate bits by (issue 5).

On calibration questions of the SQuAD excerpt that ``bench/codec.py``'s evaluation never asks (k = 3
blocks each, as there) it measures

- the sensitivity of every (layer, KV head, K or V): mean KL vs the exact KV over question + gold
  answer when only that head's keys (values) are quantized at 3 bits (Hadamard-rotated, as ``rot*``),
  on the first ``--sensitivity-questions`` questions;
- the query energy of every key channel: mean squared pre-RoPE query of the question and answer tokens,
  summed over the query heads sharing the KV head and over each RoPE pair (a pair turns together);
- the mean pre-RoPE query of every query head, placed 40-620 tokens after a key and averaged
  (``queries``): the ``tier*`` presets rank a block's tokens by the attention it predicts;
- the covariance of those question queries, placed the same way (``query_spread``): the ``tier*`` score
  adds ``k @ cov @ k / 2`` to the mean query's logit, the expected attention of Gaussian queries;
- the key basis of the ``klt*`` presets (``key_basis``): per (layer, KV head) the Fisher information of
  the next-token distribution over question + answer w.r.t. the block's pre-RoPE keys (sampled tokens,
  random-sign probes, ``--fisher-samples`` backward passes per question), and the KLT of the
  block-centred keys in that metric, stored as fp16 matrices scaled to max |entry| 1 and a weight per head.

Key weights are ``sensitivity / (sum of rotated squared channel ranges * 4**-3 / 12)`` times the
channel's query energy over its head's mean, so ``weight * range**2 * 4**-bits`` is the channel's KL
at ``bits``; value weights are ``sensitivity * 4**3``. Writes ``kvstore/codec/weights/<name>.json``.
Run: ``python -m bench.codec_calibrate --threads 1`` (about 15 minutes for SmolLM2 on one thread);
``--key-basis-only`` (``--query-spread-only``) measures only the key basis (the query spread) and sets it in
the existing file, leaving the rest as it is.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Sequence

import torch
from tqdm import tqdm

from bench.codec import Case, build_cases, kl_per_token
from bench.squad import add_data_args, load_or_exit, pick_questions
from kvstore.codec.calibration import WEIGHTS_DIR
from kvstore.codec.quant import hadamard
from kvstore.codec.sections import decode_keys, decode_values, encode_keys, encode_values
from kvstore.config import Settings
from kvstore.model.compat import with_cache
from kvstore.model.loader import Embedder, load_llm
from kvstore.model.runner import Runner, set_threads
from kvstore.types import BlockKV

BITS = 3
EVAL_QUESTIONS = 50  # bench/codec.py's run: calibration questions are taken from the others


def calibration_questions(questions: Sequence, count: int) -> list:
    """``count`` questions spread over those the 50-question evaluation does not ask."""
    asked = {id(q) for q in pick_questions(questions, EVAL_QUESTIONS)}
    pool = [q for q in questions if id(q) not in asked]
    if count > len(pool):
        raise SystemExit(f"--questions {count}: only {len(pool)} questions are left out of the evaluation")
    return [pool[(i * len(pool) // count + 3) % len(pool)] for i in range(count)]


def rotated_3bit(block: BlockKV) -> BlockKV:
    """The block with keys and values at 3 bits, rotated (what the sensitivities perturb one head with)."""
    layers = block.k.shape[0]
    sections: dict = {}
    shape = tuple(block.k.shape)
    params = encode_keys(block.k, sections, [BITS] * layers, 256, rotate=True)
    params |= encode_values(block.v, sections, [BITS] * layers, 64, rotate=True, symmetric=True)
    tensors = {n: torch.from_numpy(a) for n, a in sections.items()}
    return BlockKV(k=decode_keys(tensors, params, shape), v=decode_values(tensors, params, shape))


def reference(runner: Runner, kv: dict[int, BlockKV], cases: Sequence[Case]) -> list[torch.Tensor]:
    return [torch.log_softmax(runner.logits(runner.assemble([kv[i] for i in c.blocks]),
                                            c.question_ids + c.answer_ids), -1) for c in cases]


def sensitivities(runner: Runner, kv: dict[int, BlockKV], cases: Sequence[Case]) -> torch.Tensor:
    """``[L, H, 2]``: mean KL with one head's keys (0) or values (1) at 3 bits, the rest exact."""
    refs = reference(runner, kv, cases)
    coarse = {i: rotated_3bit(b) for i, b in kv.items()}
    layers, heads = next(iter(kv.values())).k.shape[:2]
    out = torch.zeros(layers, heads, 2)
    for layer in tqdm(range(layers), desc="sensitivity", unit="layer"):
        for head in range(heads):
            for side in (0, 1):
                mixed = {}
                for i, block in kv.items():
                    k, v = block.k.clone(), block.v.clone()
                    target, source = (k, coarse[i].k) if side == 0 else (v, coarse[i].v)
                    target[layer, head] = source[layer, head]
                    mixed[i] = BlockKV(k=k, v=v)
                kls = [kl_per_token(ref, torch.log_softmax(runner.logits(
                    runner.assemble([mixed[i] for i in c.blocks]), c.question_ids + c.answer_ids), -1))
                       for c, ref in zip(cases, refs, strict=True)]
                out[layer, head, side] = sum(kls) / len(kls)
    return out


def question_queries(runner: Runner, kv: dict[int, BlockKV], cases: Sequence[Case]) -> torch.Tensor:
    """``[L, QH, N, D]``: the pre-RoPE query of every question + answer token of the cases, per query head."""
    config = runner.model.config
    layers = runner.model.model.layers
    q_heads = config.num_attention_heads
    dim = next(iter(kv.values())).k.shape[-1]
    seen: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(index: int):
        def record(_module, _inputs, output: torch.Tensor) -> None:
            seen[index].append(output[0].detach().float())
        return record

    handles = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for c in cases:
            runner.logits(runner.assemble([kv[i] for i in c.blocks]), c.question_ids + c.answer_ids)
    finally:
        for handle in handles:
            handle.remove()
    queries = torch.stack([torch.cat(rows) for rows in seen])  # [L, N, QH * D]
    return queries.view(len(layers), -1, q_heads, dim).transpose(1, 2)


def query_stats(queries: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``queries: [L, QH, N, D]``: ``energy: [L, H, D]``, the mean squared query per channel summed over
    the query heads of each KV head and over each RoPE pair (channels c and c + D/2), and ``mean: [L, QH, D]``,
    the mean query of every query head."""
    layers, q_heads, _, dim = queries.shape
    energy = (queries ** 2).mean(2).view(layers, kv_heads, q_heads // kv_heads, dim).sum(2)
    pair = energy[..., :dim // 2] + energy[..., dim // 2:]
    return torch.cat([pair, pair], -1), queries.mean(2)


DISTANCES = torch.arange(40, 640, 20)  # question-to-token distances the tier score averages over


def _placed(runner: Runner, queries: torch.Tensor) -> torch.Tensor:
    """``[L, QH, N, D]`` pre-RoPE queries -> ``[L, QH, N * len(DISTANCES), D]``: each placed at every distance
    from a pre-RoPE key at position 0, times the attention scaling (``placed @ key`` is the logit)."""
    layers, q_heads, count, dim = queries.shape
    spread = queries[:, :, :, None, :].expand(layers, q_heads, count, len(DISTANCES), dim)
    placed = runner.rope.rotate(spread.reshape(layers, q_heads, -1, dim).contiguous(), DISTANCES.repeat(count))
    return placed * runner.model.model.layers[0].self_attn.scaling


def tier_queries(runner: Runner, mean: torch.Tensor) -> torch.Tensor:
    """``[L, QH, D]``: the mean query placed at each of :data:`DISTANCES` from a pre-RoPE key at position 0,
    averaged and times the attention scaling, so ``query @ key`` is a token's mean attention logit.

    A pre-RoPE key dotted with it ranks the block's tokens as a typical later question would attend to
    them (the ``tier*`` presets' token importance); the encoder needs neither the model nor its RoPE.
    """
    return _placed(runner, mean[:, :, None, :]).mean(2)


def query_spread(runner: Runner, queries: torch.Tensor) -> str:
    """The ``query_spread`` entry: the covariance ``[L, QH, D, D]`` of the question queries placed at every
    distance (as :func:`tier_queries` places their mean), its upper triangle row by row as base64 fp16.

    For Gaussian queries ``E[exp(q @ k)] = exp(mean @ k + k @ cov @ k / 2)``: the ``tier*`` score then
    also counts tokens that some questions attend to and the mean question does not.
    """
    placed = _placed(runner, queries)
    centred = placed - placed.mean(2, keepdim=True)
    cov = centred.transpose(-1, -2) @ centred / placed.shape[2]  # [L, QH, D, D]
    rows, cols = torch.triu_indices(cov.shape[-1], cov.shape[-1])
    return base64.b64encode(cov[..., rows, cols].half().numpy().astype("<f2").tobytes()).decode()


def key_fisher(runner: Runner, kv: dict[int, BlockKV], cases: Sequence[Case], samples: int,
               seed: int = 0) -> torch.Tensor:
    """``[L, H, D, D]``: mean over questions of ``sum_t E[g_t g_t^T] / n``, ``g_t`` the gradient of the log-probability
    of a sampled next token w.r.t. block token t's pre-RoPE key, over the question's n question + answer
    positions. Half a key error's quadratic form in it is the KL it causes (errors independent per token).

    Each backward pass probes every position at once: a random sign per position keeps the cross terms'
    expectation zero, so ``samples`` passes per question estimate the sum of per-position outer products.
    """
    generator = torch.Generator().manual_seed(seed)
    pk, pv = runner.prefix_kv  # [L, H, P, D] post-RoPE
    p = pk.shape[2]
    total = torch.zeros(())
    for case in tqdm(cases, desc="key fisher", unit="q"):
        blocks = [kv[i] for i in case.blocks]
        n = sum(b.tokens for b in blocks)
        positions = torch.arange(p, p + n)
        k_pre = torch.cat([b.k.float() for b in blocks], 2)  # [L, H, n, D]
        v = torch.cat([pv.float(), *[b.v.float() for b in blocks]], 2)[:, None]
        ids = case.question_ids + case.answer_ids
        for _ in range(samples):
            leaf = k_pre.clone().requires_grad_(True)
            k = torch.cat([pk.float(), runner.rope.rotate(leaf, positions)], 2)[:, None]
            out = runner.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(p + n, p + n + len(ids))[None],
                               **with_cache(runner.model, runner.cache_from(k, v)), use_cache=True)
            logprobs = torch.log_softmax(out.logits[0].float(), -1)  # [n_ids, vocab]
            picked = torch.multinomial(logprobs.detach().exp(), 1, generator=generator)  # [n_ids, 1]
            signs = torch.randint(0, 2, (len(ids),), generator=generator).float() * 2 - 1
            (grad,) = torch.autograd.grad((signs * logprobs.gather(1, picked)[:, 0]).sum(), [leaf])  # [L, H, n, D]
            outer = torch.einsum("lhtd,lhte->lhde", grad, grad) / (len(ids) * samples * len(cases))
            total = total + outer
    return total


def key_basis(fisher: torch.Tensor, kv: dict[int, BlockKV], ridge: float = 1e-4) -> tuple[torch.Tensor, str]:
    """The ``key_basis`` entry, ``(weight [L, H], base64 fp16 matrices)``: the KLT of the block-centred keys
    whitened by ``fisher: [L, H, D, D]``.

    With ``F = S S`` (S symmetric), the coefficients ``x = k S U`` (U the eigenvectors of the whitened
    key covariance) have uncorrelated errors priced alike: squared error in x is 2 x KL. The matrix
    ``S U`` is stored per head scaled to max |entry| 1, in fp16 (the encoder and decoder use the same
    rounded matrix), and the square of the scale taken out as the head's weight.
    """
    dim = fisher.shape[-1]
    fisher = fisher + ridge * fisher.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(dim)
    eig, vec = torch.linalg.eigh(fisher.double())
    root = (vec * eig.clamp_min(0).sqrt()[..., None, :]) @ vec.transpose(-1, -2)  # [L, H, D, D]
    centred = torch.cat([(b.k.double() - b.k.double().mean(2, keepdim=True)) for b in kv.values()], 2) @ root
    _, basis = torch.linalg.eigh(centred.transpose(-1, -2) @ centred)
    forward = root @ basis.flip(-1)  # coefficients by falling variance
    scale = forward.abs().amax((-1, -2))  # [L, H]
    data = (forward / scale[..., None, None]).half().numpy().astype("<f2").tobytes()
    return (scale * scale).float(), base64.b64encode(data).decode()


def rounded(x: torch.Tensor) -> list:
    """``x`` as nested lists of floats with 3 significant digits (the calibration file's precision)."""
    return json.loads(json.dumps(x.tolist(), default=float), parse_float=lambda s: float(f"{float(s):.3g}"))


def key_basis_json(entry: tuple[torch.Tensor, str]) -> str:
    """The ``key_basis`` entry as the calibration file stores it
    (:func:`kvstore.codec.calibration.key_basis_from_json`)."""
    weight, data = entry
    return json.dumps({"weight": rounded(weight), "data": data}, separators=(",", ":"))


def with_entry(text: str, name: str, entry: str) -> str:
    """The calibration file ``text`` with its top-level ``name`` set to the JSON ``entry``, edited as text so
    every other entry keeps its bytes (the file is written compact, so an entry re-serializes to its text)."""
    raw = json.loads(text)
    if name in raw:
        old = f',"{name}":' + json.dumps(raw[name], separators=(",", ":"))
        if old not in text:
            raise SystemExit(f"cannot find the {name} entry's text in the calibration file; rewrite it whole")
        text = text.replace(old, "")
    return text[:-1] + f',"{name}":' + entry + "}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codec_calibrate", description=__doc__.split("\n")[0])
    add_data_args(parser, default_questions=10)
    parser.add_argument("--sensitivity-questions", type=int, default=6,
                        help="questions of the per-head sensitivity sweep (default: 6)")
    parser.add_argument("--name", default="smollm2-135m", help="output file stem under kvstore/codec/weights/")
    parser.add_argument("--fisher-samples", type=int, default=12,
                        help="backward passes per question for the key basis' Fisher (default: 12)")
    parser.add_argument("--key-basis-only", action="store_true",
                        help="measure only the key basis and add it to the existing file (other entries unchanged)")
    parser.add_argument("--query-spread-only", action="store_true",
                        help="measure only the question queries' covariance (query_spread) and add it to the "
                             "existing file (other entries unchanged)")
    args = parser.parse_args(argv)
    squad = load_or_exit(args.data)
    settings = Settings()
    set_threads(args.threads)
    runner = Runner(load_llm(settings), settings.system_prompt)
    questions = calibration_questions(squad.questions, args.questions)
    cases = build_cases(runner, Embedder(settings), squad.paragraphs, questions, 3)
    used = sorted({i for c in cases for i in c.blocks})
    kv = dict(zip(used, runner.encode([runner.tokenize(squad.paragraphs[i]) for i in used]), strict=True))
    path = WEIGHTS_DIR / f"{args.name}.json"
    queries = question_queries(runner, kv, cases)  # [L, QH, N, D]
    if args.query_spread_only:
        spread_json = json.dumps({"data": query_spread(runner, queries)}, separators=(",", ":"))
        path.write_text(with_entry(path.read_text(), "query_spread", spread_json))
        print(f"added the query spread to {path}")
        return
    basis = key_basis(key_fisher(runner, kv, cases, args.fisher_samples), kv)
    if args.key_basis_only:
        path.write_text(with_entry(path.read_text(), "key_basis", key_basis_json(basis)))
        print(f"added the key basis to {path}")
        return
    energy, mean_query = query_stats(queries, runner.model.config.num_key_value_heads)  # [L, H, D], [L, QH, D]
    sens = sensitivities(runner, kv, cases[:args.sensitivity_questions])  # [L, H, 2]
    h = hadamard(energy.shape[-1])
    spread = torch.stack([((b.k.float() @ h).amax(2) - (b.k.float() @ h).amin(2)) ** 2 for b in kv.values()])
    rotated_mse = spread.mean(0).sum(-1) * 4.0 ** -BITS / 12  # [L, H]: sum over channels at 3 bits
    keys = (sens[..., 0] / rotated_mse)[..., None] * energy / energy.mean(-1, keepdim=True) / 12
    values = sens[..., 1] * 4.0 ** BITS

    path.write_text(json.dumps({"model": runner.llm.name, "shape": list(keys.shape), "keys": rounded(keys),
                                "values": rounded(values),
                                "queries": rounded(tier_queries(runner, mean_query)),
                                "query_spread": {"data": query_spread(runner, queries)}}, separators=(",", ":"))[:-1]
                    + ',"key_basis":' + key_basis_json(basis) + "}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
