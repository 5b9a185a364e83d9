"""Charts drawn on the server as inline SVG: no script, no style attribute (the console's CSP
allows neither), every label escaped (model names come from requests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

# Colour-blind-safe (Okabe-Ito), then cycled; the last model past them all shares grey.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442")
OTHER = "#999999"

WIDTH, HEIGHT = 720, 260
# Legend keys per row, a row's height, and the characters of a name that fit a key's column.
LEGEND_COLUMNS, LEGEND_ROW, LEGEND_CHARS = 3, 16, 30
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 64


@dataclass(frozen=True)
class Series:
    """One stacked layer: a name (a model) and its value per category (a day)."""

    name: str
    values: Sequence[float]


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value`` (1 for 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10 * power


def short(value: float) -> str:
    """1234 -> 1.2k, 3000000 -> 3M: axis labels that fit."""
    for bound, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= bound:
            text = f"{value / bound:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{value:g}"


def colour(index: int) -> str:
    return PALETTE[index] if index < len(PALETTE) else OTHER


def stacked_bars(categories: Sequence[str], series: Sequence[Series], *, label: str) -> Markup:
    """A stacked bar per category (e.g. a day), one layer per series (e.g. a model), with a
    y axis of four ticks and a ``<title>`` (the browser's tooltip) on every bar segment."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    totals = [sum(s.values[i] for s in series) for i in range(len(categories))]
    top = nice_ceiling(max(totals, default=0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}"'
        f' role="img" aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
    ]
    for tick in range(5):
        value = top * tick / 4
        y = TOP + plot_h - plot_h * tick / 4
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"'
            ' stroke="#dddddd"/>'
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end"'
            f' font-size="11">{escape(short(value))}</text>'
        )
    if categories:
        slot = plot_w / len(categories)
        bar = max(1.0, slot * 0.7)
        every = max(1, math.ceil(len(categories) / 12))  # at most ~12 category labels
        for i, category in enumerate(categories):
            x = LEFT + slot * i + (slot - bar) / 2
            y = TOP + plot_h
            for n, layer in enumerate(series):
                value = layer.values[i]
                if value <= 0:
                    continue
                h = plot_h * value / top
                y -= h
                tip = f"{layer.name}, {category}: {value:,.0f}"
                parts.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}"'
                    f' fill="{colour(n)}"><title>{escape(tip)}</title></rect>'
                )
            if i % every == 0:
                cx = LEFT + slot * i + slot / 2
                parts.append(
                    f'<text class="axis" x="{cx:.1f}" y="{TOP + plot_h + 16}"'
                    f' text-anchor="middle" font-size="11">{escape(category)}</text>'
                )
    # The legend: rows of LEGEND_COLUMNS keys below the plot, the drawing as tall as they need.
    rows = max(1, math.ceil(len(series) / LEGEND_COLUMNS))
    height = HEIGHT + (rows - 1) * LEGEND_ROW
    column = (WIDTH - LEFT - RIGHT) / LEGEND_COLUMNS
    for n, layer in enumerate(series):
        row, col = divmod(n, LEGEND_COLUMNS)
        x = LEFT + col * column
        y = HEIGHT - 18 + row * LEGEND_ROW
        name = (
            layer.name if len(layer.name) <= LEGEND_CHARS else layer.name[: LEGEND_CHARS - 1] + "…"
        )
        parts.append(
            f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{colour(n)}"/>'
            f'<text x="{x + 14:.1f}" y="{y}" font-size="11">{escape(name)}</text>'
        )
    parts[0] = parts[0].replace(
        f'viewBox="0 0 {WIDTH} {HEIGHT}"', f'viewBox="0 0 {WIDTH} {height}"'
    )
    parts.append("</svg>")
    return Markup("".join(parts))
