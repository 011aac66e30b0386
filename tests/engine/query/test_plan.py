"""The planner's choice of strategy per mode and knobs (kvstore.query.plan.choose_strategy)."""

from __future__ import annotations

import pytest

from kvstore.model.compaction import CompactionSpec
from kvstore.query.plan import Mode, Strategy, choose_strategy

SPEC = CompactionSpec.parse({"tau": 1.0})


@pytest.mark.parametrize(("mode", "batching", "spec", "new", "ratio", "contexts", "expected"), [
    ("text", True, None, 64, 0.3, 3, "text"),
    ("kv", True, None, 64, 0.0, 3, "batched"),  # plain path: no recompute, no compaction
    ("kv", True, None, 64, 0.3, 1, "batched"),  # a lone context is never recomputed
    ("kv", False, None, 64, 0.0, 3, "assembled"),  # batcher off
    ("kv", True, None, 64, 0.3, 3, "recompute"),  # the question rides along the recompute
    ("kv", True, SPEC, 64, 0.0, 3, "assembled"),  # compaction changes the context on its own
    ("kv", True, SPEC, 64, 0.3, 3, "assembled"),
    ("kv", True, None, 0, 0.3, 3, "assembled"),  # nothing generated: importance needs its own pass
    ("kv", True, None, 0, 0.0, 1, "assembled"),
])
def test_the_planner_picks_one_strategy(mode: Mode, batching: bool, spec: CompactionSpec | None, new: int,
                                        ratio: float, contexts: int, expected: Strategy) -> None:
    chosen = choose_strategy(mode, batching=batching, compaction=spec, max_new_tokens=new,
                             ratio=ratio, contexts=contexts)
    assert chosen == expected
