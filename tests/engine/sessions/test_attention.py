"""The attention prune's rules on constructed records (kvstore.sessions.attention): no model, no catalog."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kvstore.sessions.attention import least_attended_first, low_attention


def _segment(pk: int, ordinal: int, attention: list[float] | None) -> Any:
    return SimpleNamespace(id=pk, ordinal=ordinal, attention=attention)


def test_low_attention_is_the_recent_mean_under_the_threshold_and_needs_evidence() -> None:
    assert low_attention([0.1, 0.1], window=2, threshold=0.25)
    assert not low_attention([0.1, 0.9], window=2, threshold=0.25)  # mean 0.5
    assert low_attention([2.0, 0.1, 0.1], window=2, threshold=0.25)  # only the last ``window`` count
    assert not low_attention([], window=4, threshold=0.25)  # no brief has seen it yet


def test_least_attended_first_orders_by_recent_mean_then_age() -> None:
    segments = [_segment(10, 0, [0.2, 0.2]), _segment(11, 1, [5.0, 0.1]), _segment(12, 2, [0.2]),
                _segment(13, 3, None)]
    # Window 1: the last shares are 0.2, 0.1, 0.2 and none (0.0); ties go oldest first.
    assert least_attended_first(segments, window=1) == [13, 11, 10, 12]
    # Window 2: 0.2, 2.55, 0.2, 0.0.
    assert least_attended_first(segments, window=2) == [13, 10, 12, 11]
