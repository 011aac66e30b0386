"""Shared by every benchmark: the SQuAD data, official scoring, a fresh store, and result output.

Scoring follows the official SQuAD v1.1/v2.0 evaluation script: normalise (lower-case, drop
punctuation, drop the articles a/an/the, collapse whitespace), then exact match and token F1,
each the maximum over all reference answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from kvstore.bank import BankStore
from kvstore.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shipped with the repository (CC BY-SA 4.0, attribution in bench/data/README.md), so a fresh clone runs the
# benchmarks without anything beside it.
DEFAULT_DATA = REPO_ROOT / "bench" / "data" / "squad-v2-dev-normans.json"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
BENCHMARKS_DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"
BANK = "squad"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One answerable question with every reference answer and the paragraph it was asked about."""

    qid: str
    text: str
    answers: tuple[str, ...]
    paragraph: int


@dataclass(frozen=True)
class Squad:
    """A SQuAD-format file flattened: paragraph texts and the answerable questions."""

    path: Path
    paragraphs: tuple[str, ...]
    questions: tuple[Question, ...]


def load_squad(path: Path) -> Squad:
    """Paragraphs and answerable questions (``is_impossible`` ones and those without answers dropped)."""
    raw = json.loads(path.read_text())
    paragraphs: list[str] = []
    questions: list[Question] = []
    for article in raw["data"]:
        for para in article["paragraphs"]:
            index = len(paragraphs)
            paragraphs.append(para["context"])
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa.get("answers", [])))
                if qa.get("is_impossible") or not answers:
                    continue
                questions.append(Question(qid=qa["id"], text=qa["question"], answers=answers, paragraph=index))
    return Squad(path=path, paragraphs=tuple(paragraphs), questions=tuple(questions))


def load_or_exit(path: Path) -> Squad:
    """Load the data set or stop with status 2 and the path: a benchmark never silently skips."""
    if not path.is_file():
        print(f"error: SQuAD data file not found: {path}\n"
              f"  expected the excerpt shipped at {DEFAULT_DATA} or a file given with --data", file=sys.stderr)
        sys.exit(2)
    return load_squad(path)


def pick_questions(questions: Sequence[Question], n: int) -> list[Question]:
    """``n`` questions spread evenly over the file, so every part of the article is represented."""
    if n >= len(questions):
        return list(questions)
    return [questions[i * len(questions) // n] for i in range(n)]


def add_data_args(parser: argparse.ArgumentParser, default_questions: int) -> None:
    """The options every SQuAD benchmark takes."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"SQuAD-format JSON file (default: {DEFAULT_DATA})")
    parser.add_argument("--questions", type=int, default=default_questions,
                        help=f"answerable questions to ask, spread over the file (default: {default_questions})")
    parser.add_argument("--threads", type=int, default=Settings().torch_threads,
                        help="torch threads (default: KVRAG_TORCH_THREADS, else 0 = every core); on a box shared "
                             "with other jobs, 1 avoids threads waiting on each other")


# -- scoring --------------------------------------------------------------------------------------


def bootstrap_ci(diffs: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-question differences (variant minus baseline),
    resampling the questions with replacement; a fixed seed, so the same records give the same interval."""
    if not diffs:
        return 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        # Official rule: two empty answers agree; one empty answer scores zero.
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(exact match, token F1), each the best over the reference answers."""
    em = max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)
    f1 = max(_f1(prediction, r) for r in references)
    return em, f1


# -- the store ------------------------------------------------------------------------------------


def open_store(data_dir: Path, **settings: Any) -> BankStore:
    """A BankStore on the packaged defaults (SmolLM2 + MiniLM) in ``data_dir``, with knob overrides."""
    return BankStore(Settings(data_dir=data_dir, **settings))


def ingest(store: BankStore, paragraphs: Sequence[str], bank: str = BANK) -> None:
    """Create ``bank`` and put every paragraph as its own document."""
    store.create_bank(bank)
    for i, text in enumerate(tqdm(paragraphs, desc="ingest", unit="doc")):
        store.put_document(bank, f"p{i:03d}", text)


def machine_info(model: str) -> dict[str, Any]:
    """What the numbers were measured on: timings on a shared 2-core box are only comparable as ratios."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "model": model,
        "load_average": os.getloadavg(),
        "git_commit": git_commit(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# The code a measurement depends on; bench/results and docs change with every run, so they do not count.
CODE_PATHS = ("kvstore", "bench/*.py", "server", "pyproject.toml")


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD's short hash, with "+uncommitted" when the code differs from it (a run of work in progress)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True)
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *CODE_PATHS], cwd=root,
                                 capture_output=True, check=False)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() + ("+uncommitted" if changed.returncode == 1 else "")


# -- results --------------------------------------------------------------------------------------


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` atomically (a temp file then rename)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def save_figure(fig: Figure, name: str) -> Path:
    """Save a matplotlib figure as ``bench/results/<name>.png``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table on stdout (rich when installed, plain columns otherwise)."""
    cells = [[_cell(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
        for row in cells:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for row in cells:
        table.add_row(*row)
    # Wide enough for every column when stdout is a pipe or a log file (rich would assume 80).
    Console(width=max(160, Console().width)).print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub markdown, for docs/BENCHMARKS.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def doc_markdown(result: dict[str, Any], headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A result's table for docs/BENCHMARKS.md, headed by what it was measured on."""
    m = result["machine"]
    return (f"{result['questions']} questions, {m['model']}, {m['cpu_count']} CPUs, "
            f"{m['torch_threads']} torch threads, load average {m['load_average'][0]:.1f} at the end, "
            f"commit {m['git_commit']}, {m['measured_at']}.\n\n" + markdown_table(headers, rows))


def update_doc_table(name: str, markdown: str) -> bool:
    """Replace the text between ``<!-- name:table -->`` and ``<!-- /name:table -->`` in docs/BENCHMARKS.md.

    Only that span changes, so other engineers' sections are never touched; without the markers
    nothing is written and False comes back (the caller prints the table to paste by hand).
    """
    start, end = f"<!-- {name}:table -->", f"<!-- /{name}:table -->"
    if not BENCHMARKS_DOC.is_file():
        return False
    text = BENCHMARKS_DOC.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    BENCHMARKS_DOC.write_text(f"{head}{start}\n{markdown}\n{end}{tail}")
    return True


def publish_doc_table(name: str, markdown: str) -> None:
    """Put ``markdown`` into the benchmark's span of docs/BENCHMARKS.md, or print it to paste by hand."""
    if update_doc_table(name, markdown):
        print(f"updated the {name} table in docs/BENCHMARKS.md")
    else:
        print(f"docs/BENCHMARKS.md has no {name} markers; paste this:\n{markdown}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
