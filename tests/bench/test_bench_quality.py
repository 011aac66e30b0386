"""bench/quality's summary: F1 against text with a paired bootstrap interval (no model needed)."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from bench.quality import held_out_questions, summarise
from bench.squad import Question, bootstrap_ci, git_commit, pick_questions


def test_bootstrap_interval_holds_the_mean_and_is_reproducible() -> None:
    diffs = [0.0, 0.5, -0.2, 0.1, 0.0, 0.3, -0.1, 0.0]
    low, high = bootstrap_ci(diffs)
    assert low <= statistics.fmean(diffs) <= high and low < high
    assert bootstrap_ci(diffs) == (low, high)
    assert bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    assert bootstrap_ci([]) == (0.0, 0.0)


def test_summary_pairs_each_variant_with_text_by_question() -> None:
    def record(variant: str, qid: str, f1: float) -> dict[str, object]:
        return {"variant": variant, "k": 5, "qid": qid, "f1": f1, "em": 0.0, "kl": 0.0, "nll": 1.0, "agree": True,
                "ttft_ms": 10.0, "context_tokens": 100, "kept_tokens": 100, "gold_retrieved": True}

    records = [record("text", "a", 1.0), record("text", "b", 0.0), record("kv", "b", 0.5), record("kv", "a", 0.5)]
    rows = {r["variant"]: r for r in summarise(records, ["text", "kv"], [5])}
    assert rows["text"]["f1_vs_text"] == 0.0 and rows["text"]["f1_vs_text_ci95"] == (0.0, 0.0)
    assert rows["kv"]["f1_vs_text"] == 0.0  # -0.5 on a, +0.5 on b: paired by question, not by order
    low, high = rows["kv"]["f1_vs_text_ci95"]
    assert low == -0.5 and high == 0.5


def test_held_out_questions_never_overlap_the_published_spread() -> None:
    questions = [Question(qid=f"q{i}", text="?", answers=("a",), paragraph=0) for i in range(96)]
    dev = held_out_questions(questions, 60, 20)
    published = {q.qid for q in pick_questions(questions, 60)}
    assert len(dev) == 20 and len({q.qid for q in dev}) == 20
    assert not published & {q.qid for q in dev}


def test_a_run_of_uncommitted_code_says_so(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "kvstore").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "kvstore" / "runner.py").write_text("x = 1\n")
    (tmp_path / "docs" / "BENCHMARKS.md").write_text("results\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "docs" / "BENCHMARKS.md").write_text("new results\n")  # a run's own output is not code
    assert git_commit(tmp_path) == head
    (tmp_path / "kvstore" / "runner.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}+uncommitted"
    assert git_commit(tmp_path / "kvstore" / "missing") is None
