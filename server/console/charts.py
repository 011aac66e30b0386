"""The recent-queries chart, drawn on the server as inline SVG.

Hand-written rather than a charting library: it is one scatter-and-line plot of a few hundred points, and
as SVG in the page it needs no script (the console's policy allows none), no asset to vendor and no
runtime dependency; each point's ``<title>`` is its tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from kvstore.storage.querylog import QueryLogEntry

MODES = ("kv", "text")
WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 14, 34


@dataclass
class ModeSummary:
    """Timings of one mode over the logged queries (nearest-rank percentiles)."""

    mode: str
    count: int
    ttft_p50: float
    ttft_p90: float
    total_p50: float
    context_tokens_mean: float


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(entries: Sequence[QueryLogEntry]) -> list[ModeSummary]:
    """Per mode that ran, in ``MODES`` order."""
    out = []
    for mode in MODES:
        rows = [e for e in entries if e.mode == mode]
        if rows:
            out.append(ModeSummary(mode=mode, count=len(rows), ttft_p50=percentile([e.ttft_ms for e in rows], 50),
                                   ttft_p90=percentile([e.ttft_ms for e in rows], 90),
                                   total_p50=percentile([e.total_ms for e in rows], 50),
                                   context_tokens_mean=sum(e.context_tokens for e in rows) / len(rows)))
    return out


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (the y axis' top)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def ttft_chart(entries: Sequence[QueryLogEntry]) -> Markup:
    """Time to first token of each logged query, oldest to newest, one line per mode (kv, text)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = nice_ceiling(max((e.ttft_ms for e in entries), default=0.0))
    n = len(entries)

    def x(i: int) -> float:
        return LEFT + (plot_w * (i + 0.5) / n if n else 0.0)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    parts = [f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'aria-label="time to first token per query, kv and text">']
    for k in range(5):
        value = top * k / 4
        gy = _fmt(y(value))
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy}" y2="{gy}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{gy}" text-anchor="end" dominant-baseline="middle">'
                     f'{value:g} ms</text>')
    parts.append(f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">'
                 f'logged queries, oldest to newest ({n})</text>')
    for mode in MODES:
        points = [(i, e) for i, e in enumerate(entries) if e.mode == mode]
        if not points:
            continue
        if len(points) > 1:
            path = " ".join(f"{_fmt(x(i))},{_fmt(y(e.ttft_ms))}" for i, e in points)
            parts.append(f'<polyline class="series {mode}" points="{path}"/>')
        for i, e in points:
            tip = escape(f"{mode}: TTFT {e.ttft_ms:.1f} ms, total {e.total_ms:.1f} ms, k={e.k}, "
                         f"{e.context_tokens} context tokens")
            parts.append(f'<circle class="point {mode}" cx="{_fmt(x(i))}" cy="{_fmt(y(e.ttft_ms))}" r="3">'
                         f'<title>{tip}</title></circle>')
    legend_x = WIDTH - RIGHT - 150
    for j, mode in enumerate(MODES):
        ly = TOP + 10 + 16 * j
        parts.append(f'<circle class="point {mode}" cx="{legend_x}" cy="{ly}" r="4"/>'
                     f'<text class="legend" x="{legend_x + 10}" y="{ly}" dominant-baseline="middle">'
                     f'{mode} mode TTFT</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
