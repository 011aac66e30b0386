"""bench.ttft --http's summary: first touch is the headline every ratio is taken against (issue 33)."""

from __future__ import annotations

from bench.ttft_http import goals, summarise, table_rows


def _samples(variant: str, ttfts: list[float], **stages: float) -> list[dict[str, object]]:
    return [{"variant": variant, "qid": str(i), "ttft_ms": t, **stages} for i, t in enumerate(ttfts)]


def test_ratios_are_against_first_touch_and_the_floor_against_warm() -> None:
    samples = (_samples("kv, first touch", [100, 110, 120, 400], server_ttft_ms=90, http_ms=10, retrieve_ms=30,
                        load_ms=0.0, prefill_ms=60)
               + _samples("text, first touch", [1200, 1300, 1400, 1500], server_ttft_ms=1190, http_ms=10)
               + _samples("kv, warm", [80, 90, 90, 100])
               + _samples("text, warm", [1100, 1200, 1300, 1400])
               + _samples("floor: question forward, in process", [60, 70, 70, 80], prefill_ms=70)
               + _samples("llama.cpp text-RAG", [1500, 1600, 1700, 1800], retrieve_ms=30, prefill_ms=1600))
    rows = summarise(samples)
    assert [r["variant"] for r in rows][:2] == ["kv, first touch", "text, first touch"]  # the headline first
    kv = rows[0]
    assert kv["ttft_ms_median"] == 115.0 and kv["ttft_ms_p90"] == 316.0 and kv["load_ms_median"] == 0.0
    got = goals(rows)
    assert got["text"]["measured"] == round(1350 / 115, 2) and got["text"]["met"]
    assert got["llama.cpp"]["measured"] == round(1650 / 115, 2) and got["llama.cpp"]["met"]
    assert got["floor"]["measured"] == round(90 / 70, 2) and got["floor"]["met"]
    table = table_rows(rows)
    assert table[0][-1] == "1.0x" and table[2][5] == "-"  # a row without an HTTP hop shows a dash


def test_goals_not_met_and_no_llama_row() -> None:
    rows = summarise(_samples("kv, first touch", [300]) + _samples("text, first touch", [1200])
                     + _samples("kv, warm", [300]))
    got = goals(rows)
    assert set(got) == {"text"} and got["text"]["measured"] == 4.0 and not got["text"]["met"]


def test_a_floor_slower_than_the_server_is_not_a_met_goal() -> None:
    rows = summarise(_samples("kv, first touch", [300]) + _samples("kv, warm", [250])
                     + _samples("floor: question forward, in process", [5000]))
    floor = goals(rows)["floor"]
    assert floor["measured"] == 0.05 and not floor["met"] and "not assessed" in floor["invalid"]
