"""Server-rendered SVG charts: no JavaScript library, nothing fetched at run time, and every
point is an element a test (or a screen reader) can read: `<circle class="point"
data-series="accuracy" data-round="2" data-value="0.4875">` with a `<title>` tooltip.

Colours are SVG presentation attributes, not CSS, so the pages' Content-Security-Policy
(no inline styles) lets them through.
"""

from __future__ import annotations

import math
from html import escape
from typing import Iterable, Sequence

WIDTH, HEIGHT = 600, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 26, 34
BLUE, RED, GREEN, PURPLE, AMBER, GREY = "#2563eb", "#dc2626", "#16a34a", "#7c3aed", "#d97706", "#9ca3af"


class Series:
    def __init__(self, name: str, label: str, color: str, points: Iterable[tuple[int, float | None]]):
        self.name, self.label, self.color = name, label, color
        self.points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]


def _nice_max(value: float, ticks: int = 4) -> float:
    """The smallest round number >= value that splits into `ticks` round steps."""
    if value <= 0:
        return 1.0
    raw = value / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if raw <= step * magnitude * (1 + 1e-9):
            return round(step * magnitude * ticks, 12)
    return 10 * magnitude * ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}".rstrip("0").rstrip(".")


def _x_ticks(rounds: int) -> list[int]:
    step = max(1, math.ceil(rounds / 12))
    return [r for r in range(1, rounds + 1) if (r - 1) % step == 0 or r == rounds]


class _Frame:
    def __init__(self, rounds: int, y_max: float, y_label: str, ticks: int = 4):
        self.rounds = max(1, rounds)
        self.y_max = y_max
        self.ticks = ticks
        self.y_label = y_label
        self.inner_w = WIDTH - LEFT - RIGHT
        self.inner_h = HEIGHT - TOP - BOTTOM

    def x(self, number: float) -> float:
        if self.rounds == 1:
            return LEFT + self.inner_w / 2
        return LEFT + (number - 1) / (self.rounds - 1) * self.inner_w

    def slot(self) -> float:
        return self.inner_w / self.rounds

    def bar_x(self, number: int) -> float:
        return LEFT + (number - 1) * self.slot()

    def y(self, value: float) -> float:
        return TOP + self.inner_h * (1 - min(max(value / self.y_max, 0.0), 1.0))

    def axes(self, *, bars: bool = False) -> list[str]:
        parts = []
        for i in range(self.ticks + 1):
            value = self.y_max * i / self.ticks
            y = self.y(value)
            parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
            parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                         f'fill="#4b5563">{_fmt(value)}</text>')
        for number in _x_ticks(self.rounds):
            x = self.bar_x(number) + self.slot() / 2 if bars else self.x(number)
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11" '
                         f'fill="#4b5563">{number}</text>')
        parts.append(f'<text x="{LEFT + self.inner_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle" '
                     f'font-size="11" fill="#374151">round</text>')
        parts.append(f'<text x="12" y="{TOP + self.inner_h / 2:.1f}" text-anchor="middle" font-size="11" '
                     f'fill="#374151" transform="rotate(-90 12 {TOP + self.inner_h / 2:.1f})">'
                     f'{escape(self.y_label)}</text>')
        parts.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#9ca3af"/>')
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}" '
                     f'stroke="#9ca3af"/>')
        return parts


def _legend(entries: Sequence[tuple[str, str]]) -> list[str]:
    parts, x = [], WIDTH - RIGHT
    for label, color in reversed(entries):
        width = 14 + 6.5 * len(label)
        x -= width + 10
        parts.append(f'<rect x="{x:.1f}" y="6" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14:.1f}" y="15" font-size="11" fill="#374151">{escape(label)}</text>')
    return parts


def _svg(name: str, title: str, body: list[str]) -> str:
    return (f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
            + "".join(body) + "</svg>")


def line_chart(name: str, title: str, series: Sequence[Series], *, rounds: int, y_label: str,
               y_max: float | None = None, guide: tuple[str, float] | None = None) -> str:
    """One line per series over rounds 1..rounds; y from 0 to y_max (or a round number above
    the largest value); guide: a labelled horizontal line (a budget)."""
    values = [y for s in series for _, y in s.points]
    top = y_max if y_max is not None else _nice_max(max([*values, guide[1] if guide else 0.0] or [1.0]) * 1.05)
    frame = _Frame(max([rounds, *(x for s in series for x, _ in s.points)]), top, y_label)
    body = frame.axes()
    if guide is not None:
        y = frame.y(guide[1])
        body.append(f'<line class="guide" data-value="{guide[1]!r}" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" '
                    f'y2="{y:.1f}" stroke="{GREY}" stroke-dasharray="6 4"/><text x="{WIDTH - RIGHT - 4}" '
                    f'y="{y - 4:.1f}" text-anchor="end" font-size="11" fill="#4b5563">{escape(guide[0])} '
                    f'{_fmt(guide[1])}</text>')
    if not values:
        body.append(f'<text x="{LEFT + frame.inner_w / 2:.1f}" y="{TOP + frame.inner_h / 2:.1f}" '
                    f'text-anchor="middle" font-size="13" fill="#6b7280">no round has a value yet</text>')
    for s in series:
        coords = [(frame.x(x), frame.y(y), x, y) for x, y in sorted(s.points)]
        if len(coords) > 1:
            path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy, _, _ in coords)
            body.append(f'<polyline class="line" data-series="{escape(s.name)}" fill="none" stroke="{s.color}" '
                        f'stroke-width="2" points="{path}"/>')
        for cx, cy, x, y in coords:
            body.append(f'<circle class="point" data-series="{escape(s.name)}" data-round="{x}" '
                        f'data-value="{y!r}" cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{s.color}">'
                        f'<title>round {x}: {escape(s.label)} {_fmt(y) if y >= 1 else f"{y:.4f}"}</title>'
                        f'</circle>')
    body += _legend([(s.label, s.color) for s in series])
    return _svg(name, title, body)


def participation_chart(rounds: Sequence[dict], *, total: int) -> str:
    """Per round: updates included, rejected, and expected nodes that did not submit."""
    expected = max([r.get("expected", 0) for r in rounds] + [1])
    step = math.ceil(expected / 5)  # whole participants per tick, at most 5 ticks
    ticks = math.ceil(expected / step)
    frame = _Frame(max([total, *(r["number"] for r in rounds)]), float(step * ticks), "participants", ticks)
    body = frame.axes(bars=True)
    width = frame.slot() * 0.6
    for r in rounds:
        x = frame.bar_x(r["number"]) + frame.slot() * 0.2
        rejected = len(r.get("rejected") or {})
        included = r["included"] if r.get("global_model") else 0
        pending = max(0, r["submitted"] - included - rejected)  # submitted, not aggregated (yet)
        missing = max(0, r["expected"] - r["submitted"])
        waiting = ("timed out", AMBER) if r.get("phase") == "timeout" else ("submitted", BLUE)
        stack = 0.0
        for kind, count, color in (("included", included, GREEN), ("rejected", rejected, RED),
                                   (waiting[0], pending, waiting[1]), ("missing", missing, "#e5e7eb")):
            if not count:
                continue
            y_top, y_bottom = frame.y(stack + count), frame.y(stack)
            body.append(f'<rect class="bar" data-kind="{kind}" data-round="{r["number"]}" data-value="{count}" '
                        f'x="{x:.1f}" y="{y_top:.1f}" width="{width:.1f}" height="{y_bottom - y_top:.1f}" '
                        f'fill="{color}"><title>round {r["number"]}: {count} {kind}</title></rect>')
            stack += count
    legend = [("included", GREEN), ("rejected", RED), ("awaiting aggregation", BLUE)]
    if any(r.get("phase") == "timeout" for r in rounds):
        legend.append(("round timed out", AMBER))
    body += _legend([*legend, ("did not submit", "#d1d5db")])
    return _svg("participation", "participation per round", body)
