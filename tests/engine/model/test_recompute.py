"""Selective recompute (CacheBlend): ratio 1 is a text prefill, ratio 0 is plain kv, and in between helps."""

from __future__ import annotations

import pytest
import torch

from kvstore.model import recompute, scatter
from kvstore.model.recompute import blend, select_tokens
from kvstore.model.runner import Runner
from tests.conftest import TINY_FAMILIES, build_tiny

BLOCKS = (
    "The Normans were the people who gave their name to Normandy, a region in France.",
    "Paris is the capital and most populous city of France. The Seine flows through it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)
QUESTION = "Who were the Normans?"
LAYERS = 4  # deeper than the probe layer, so partial ratios differ from a full recompute


def _config(kind: str) -> dict[str, object]:
    overrides = dict(TINY_FAMILIES[kind], num_hidden_layers=LAYERS)
    if "layer_types" in overrides:
        overrides["layer_types"] = list(overrides["layer_types"]) * (LAYERS // 2)  # type: ignore[arg-type]
    return overrides


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def runner(request: pytest.FixtureRequest) -> Runner:
    return Runner(build_tiny(request.param, **_config(request.param)), "You are a helpful assistant.")


def _kl(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean KL(want || got) over rows of logits ``[tokens, vocab]``, nats/token."""
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none")
    return kl.sum(-1).mean().item()


def _case(runner: Runner) -> tuple[list[list[int]], list[int], list[int], torch.Tensor]:
    blocks = [runner.tokenize(b) for b in BLOCKS]
    ids = [t for b in blocks for t in b]
    question = runner.question_ids(QUESTION)
    text = runner.logits(runner.text_context(), ids + question)[-len(question):]
    return blocks, ids, question, text


def _kl_at(runner: Runner, ratio: float, weighted: bool = False) -> tuple[float, int]:
    blocks, ids, question, text = _case(runner)
    ctx = runner.assemble(runner.encode(blocks))
    count = blend(runner, ctx, ids, ratio, question_ids=question if weighted else None)
    return _kl(runner.logits(ctx, question), text), count


@pytest.mark.parametrize("weighted", [False, True])
def test_ratio_one_equals_the_text_path(runner: Runner, weighted: bool) -> None:
    kl, count = _kl_at(runner, 1.0, weighted)
    assert count == sum(len(runner.tokenize(b)) for b in BLOCKS)
    assert kl <= 1e-3
    assert abs(kl) <= 1e-5  # in fact exact up to float error


@pytest.mark.parametrize("weighted", [False, True])
def test_ratio_zero_equals_plain_kv(runner: Runner, weighted: bool) -> None:
    blocks, ids, question, _ = _case(runner)
    kvs = runner.encode(blocks)
    plain = runner.logits(runner.assemble(kvs), question)
    ctx = runner.assemble(kvs)
    assert blend(runner, ctx, ids, 0.0, question_ids=question if weighted else None) == 0
    assert torch.equal(runner.logits(ctx, question), plain)


@pytest.mark.parametrize("weighted", [False, True])
def test_partial_recompute_moves_towards_text(runner: Runner, weighted: bool) -> None:
    plain, _ = _kl_at(runner, 0.0)
    half, count = _kl_at(runner, 0.5, weighted)
    assert count == len(_case(runner)[1]) // 2
    assert half < plain


def test_selection_picks_distinct_context_tokens(runner: Runner) -> None:
    blocks, ids, _, _ = _case(runner)
    ctx = runner.assemble(runner.encode(blocks))
    chosen = select_tokens(runner, ctx, ids, 5)
    assert chosen.shape == (5,) and chosen.unique().numel() == 5
    assert int(chosen.min()) >= 0 and int(chosen.max()) < len(ids)


def test_question_attention_weights_the_selection(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deviation times attention: tokens the question does not attend to are never chosen, however stale."""
    blocks, ids, question, _ = _case(runner)
    # Tokens of the last block: encoded without the blocks before it, so their stored values deviate.
    wanted = torch.tensor([len(ids) - 9, len(ids) - 5, len(ids) - 2])
    attention = torch.zeros(len(ids))
    attention[wanted] = 1.0
    seen: list[list[int]] = []

    def fake_scores(r: Runner, ctx: object, question_ids: list[int], **how: object) -> torch.Tensor:
        seen.append(list(question_ids))
        return attention

    monkeypatch.setattr(recompute, "token_scores", fake_scores)
    ctx = runner.assemble(runner.encode(blocks))
    assert torch.equal(select_tokens(runner, ctx, ids, 3, question_ids=question), wanted)
    assert seen == [question]
    # Without a question the same call ranks by deviation alone and asks for no attention.
    ctx = runner.assemble(runner.encode(blocks))
    assert select_tokens(runner, ctx, ids, 3).shape == (3,) and len(seen) == 1


def test_bad_arguments_are_refused(runner: Runner) -> None:
    blocks, ids, _, _ = _case(runner)
    ctx = runner.assemble(runner.encode(blocks))
    with pytest.raises(ValueError):
        blend(runner, ctx, ids, 1.5)
    with pytest.raises(ValueError):
        blend(runner, ctx, ids[:-1], 0.5)


def test_recompute_resumes_from_the_probe_hidden_states(runner: Runner) -> None:
    """Starting the selected tokens after the probe layer, from the probe's hidden states, writes the same KV as
    running them from their embeddings through every layer (the probe's layers are exact for every token)."""
    blocks, ids, _, _ = _case(runner)
    kvs = runner.encode(blocks)
    token_ids = torch.tensor(ids)
    built = []
    for resume in (True, False):
        ctx = runner.assemble(kvs)
        layer = recompute.probe_stages(runner)[0][0]
        assert layer < runner.num_layers - 1
        p = ctx.next_position - ctx.context_tokens
        with torch.inference_mode():
            probe = recompute._probe(runner, ctx, torch.arange(len(ids)) + p, token_ids, layer)
            chosen = probe.deviation.topk(len(ids) // 3).indices.sort().values
            rows = chosen + p
            assert probe.hidden is not None and probe.hidden.shape[0] == len(ids)
            if resume:
                scatter.run_rows(runner, scatter.ScatterCache(ctx, rows), rows, probe.hidden[chosen],
                                 start=layer + 1)
            else:
                scatter.run_rows(runner, scatter.ScatterCache(ctx, rows), rows, token_ids[chosen])
        built.append(ctx)
    for a, b in zip(built[0].cache.layers, built[1].cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weighted", [False, True])
def test_exact_leading_tokens_are_not_chosen(runner: Runner, weighted: bool) -> None:
    """The first block, encoded right after the prefix, already holds text-prefill KV: never worth a recompute."""
    blocks, ids, question, _ = _case(runner)
    first = len(blocks[0])
    ctx = runner.assemble(runner.encode(blocks))
    chosen = select_tokens(runner, ctx, ids, 6, question_ids=question if weighted else None, exact_tokens=first)
    assert chosen.shape == (6,) and int(chosen.min()) >= first


def test_partial_ratios_recompute_only_the_candidates_rows(runner: Runner) -> None:
    """A question-weighted recompute rewrites the rows of the probed candidates (at most the first stage's multiple
    x count) and nothing else, and ratio 1 with the question is still the text path."""
    blocks, ids, question, _ = _case(runner)
    kvs = runner.encode(blocks)
    before = runner.assemble(kvs)
    ctx = runner.assemble(kvs)
    count = blend(runner, ctx, ids, 0.2, question_ids=question)
    changed = torch.zeros(ctx.cache.get_seq_length(), dtype=torch.bool)
    for a, b in zip(before.cache.layers, ctx.cache.layers, strict=True):
        for old, new in ((a.keys, b.keys), (a.values, b.values)):
            changed |= (old - new).abs().amax(dim=(0, 1, 3)) > 0
    p = ctx.next_position - ctx.context_tokens
    assert not bool(changed[:p].any())
    assert count <= int(changed.sum()) <= round(recompute.PROBE_STAGES[0].multiple * count)


def test_probe_stages_narrow_as_they_go_deeper(runner: Runner) -> None:
    """Each probe stage rewrites the rows of fewer tokens than the stage before: 2 x count up to the first check
    layer, 1.5 x count up to the second, exactly the chosen count in the layers after it. (Layer 0's KV is the
    same at any context, so stages check layers 1 and 2 of the 4 here.)"""
    blocks, ids, question, _ = _case(runner)
    stages = (recompute.Stage(0.34, 2.0), recompute.Stage(0.67, 1.5))
    assert [layer for layer, _ in recompute.probe_stages(runner, stages)] == [1, 2]
    kvs = runner.encode(blocks)
    before, ctx = runner.assemble(kvs), runner.assemble(kvs)
    count = blend(runner, ctx, ids, 0.2, stages, question_ids=question)
    changed = [int(((a.values - b.values).abs().amax(dim=(0, 1, 3)) > 0).sum())
               for a, b in zip(before.cache.layers, ctx.cache.layers, strict=True)]
    first, second = (round(stage.multiple * count) for stage in stages)
    assert count < changed[1] <= first and count <= changed[2] <= second < first
    assert changed[3] == count


def test_probe_stages_keep_rising_check_layers() -> None:
    """A stage that would not check a deeper layer than the one before it is dropped (models of few layers)."""
    class Depth:
        def __init__(self, num_layers: int) -> None:
            self.num_layers = num_layers

    stages = (recompute.Stage(0.07, 2.0), recompute.Stage(0.31, 1.5))
    assert recompute.probe_stages(Depth(30), stages) == [(2, 2.0), (9, 1.5)]  # type: ignore[arg-type]
    assert recompute.probe_stages(Depth(2), stages) == [(0, 2.0)]  # type: ignore[arg-type]
    assert recompute.probe_stages(Depth(1), (recompute.Stage(1.0, 2.0),)) == [(0, 2.0)]  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_asking_along_equals_blending_then_prefilling(runner: Runner, ratio: float) -> None:
    """The question riding along the probe and recompute passes sees exactly the blended context: its logits
    and the answer decoded from them are those of a prefill after :func:`blend`."""
    blocks, ids, question, _ = _case(runner)
    kvs = runner.encode(blocks)
    ctx = runner.assemble(kvs)
    count = blend(runner, ctx, ids, ratio, question_ids=question, exact_tokens=len(blocks[0]))
    want = runner.generate(ctx, question, 6)
    ctx = runner.assemble(kvs)
    rows = ctx.cache.get_seq_length()
    asked = recompute.blend_and_ask(runner, ctx, ids, question, ratio, exact_tokens=len(blocks[0]))
    assert asked.recomputed == count
    assert ctx.cache.get_seq_length() == rows + len(question) and ctx.next_position == rows
    plain = runner.assemble(kvs)
    blend(runner, plain, ids, ratio, question_ids=question, exact_tokens=len(blocks[0]))
    torch.testing.assert_close(asked.logits, runner.prefill(plain, question), rtol=1e-4, atol=1e-4)
    for layer, other in zip(ctx.cache.layers, plain.cache.layers, strict=True):
        torch.testing.assert_close(layer.keys, other.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.values, other.values, rtol=1e-4, atol=1e-4)
    got = runner.decode(ctx, asked.logits, ctx.next_position + len(question), 6)
    assert got.token_ids == want.token_ids
    assert (asked.attention is not None) == (0.0 < ratio < 1.0)
