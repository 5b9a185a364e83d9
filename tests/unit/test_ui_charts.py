"""The console's server-drawn SVG: escaped labels, no script or style, bars scaled to a
rounded top."""

from __future__ import annotations

import re

import pytest

from api.ui.charts import Series, nice_ceiling, short, stacked_bars


@pytest.mark.parametrize(
    ("value", "top"),
    [(0, 1), (-3, 1), (0.3, 0.5), (1, 1), (7, 10), (11, 20), (249, 250), (2600, 5000)],
)
def test_nice_ceiling_rounds_up_to_1_2_2_5_or_5_times_a_power_of_ten(
    value: float, top: float
) -> None:
    assert nice_ceiling(value) == pytest.approx(top)


def test_short_axis_labels() -> None:
    assert [short(v) for v in (0, 950, 1234, 3_000_000, 2.5e9)] == [
        "0",
        "950",
        "1.2k",
        "3M",
        "2.5G",
    ]


def test_labels_are_escaped_and_nothing_runs() -> None:
    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    svg = str(stacked_bars(["d1", hostile], [Series(hostile, [1, 2])], label=hostile))
    # Text, never markup: the tags arrive escaped, so no element (and no handler) exists.
    assert "<script" not in svg and "<img" not in svg
    assert "&lt;script&gt;" in svg and "&lt;img src=x onerror=" in svg
    assert "style=" not in svg


def test_segments_stack_to_the_day_total_against_the_rounded_top() -> None:
    svg = str(
        stacked_bars(
            ["mon", "tue"],
            [Series("a", [100, 0]), Series("b", [150, 40])],
            label="tokens",
        )
    )
    heights = [
        float(h)
        for h in re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)" fill', svg)
    ]
    # mon: 100 + 150 = 250 = the top (nice_ceiling(250)); tue: 40 (a zero segment is not drawn)
    plot = 260 - 12 - 64
    assert heights[:3] == pytest.approx(
        [plot * 100 / 250, plot * 150 / 250, plot * 40 / 250], abs=0.1
    )
    assert svg.count("<title>") == 1 + 3


def test_no_data_draws_axes_only() -> None:
    svg = str(stacked_bars([], [], label="nothing yet"))
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "<rect" not in svg


def test_many_models_wrap_the_legend_into_rows_inside_the_drawing() -> None:
    names = [f"model-{i}-{'x' * 40}" for i in range(8)]
    svg = str(stacked_bars(["d"], [Series(n, [1]) for n in names], label="tokens"))
    # 8 keys in rows of 3: three rows, the drawing 2 rows taller; names cut to fit a column.
    assert 'viewBox="0 0 720 292"' in svg
    xs = [float(x) for x in re.findall(r'<rect x="([0-9.]+)" y="[0-9.]+" width="10"', svg)]
    assert len(xs) == 8 and max(xs) < 720
    assert svg.count("…</text>") == 8  # the legend cuts names; the bars' tooltips keep them
