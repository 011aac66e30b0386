"""bench/codec's report: where a preset's disagreements with fp16 sit, and how sure its agreement is."""

from __future__ import annotations

import pytest

from bench.codec import near_ties, resolved_default, wilson_interval


def _rows(margins: list[float], agree: list[bool]) -> list[dict]:
    return [{"preset": "fp16", "margin": margins, "agree_each": [True] * len(margins)},
            {"preset": "x", "agree_each": agree}]


def test_disagreements_are_placed_against_the_reference_margins() -> None:
    rows = _rows([0.01, 0.5, 0.02, 2.0, 0.03], [False, True, True, True, False])
    text = near_ties(rows, rows[1])
    assert "2 disagreements" in text and "0.010, 0.030" in text and "3 of 5 questions" in text
    assert "median question's 0.030" in text


def test_nothing_to_say_without_disagreements_or_margins() -> None:
    rows = _rows([0.1, 0.2], [True, True])
    assert near_ties(rows, rows[1]) == ""
    assert near_ties([{"preset": "fp16"}, {"preset": "x", "agree_each": [False]}], {"agree_each": [False]}) == ""


def test_the_wilson_interval_brackets_the_measured_share() -> None:
    low, high = wilson_interval(45, 50)
    assert abs(low - 0.786) < 0.005 and abs(high - 0.957) < 0.005  # published values for 45 of 50
    low, high = wilson_interval(50, 50)
    assert high == pytest.approx(1.0) and 0.92 < low < 0.94


def test_the_reported_default_resolves_auto_by_the_recorded_model_shape() -> None:
    assert resolved_default("auto", [30, 3, 64]) == "auto (tklt5 for this model)"
    assert resolved_default("auto", [2, 2, 16]) == "auto (int8 for this model)"
    assert resolved_default("auto", None) == "auto"
    assert resolved_default("fp16", [30, 3, 64]) == "fp16"
