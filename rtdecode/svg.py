"""Plots as inline SVG for the HTML reports (calibration's, evaluation's): no plotting library, no JavaScript.

:func:`svg_lines` draws line series, :func:`svg_histogram` a histogram; both skip non-finite values, label their
ticks with the data's own min, middle and max, escape every text and draw a "no data" frame when there is nothing.
"""

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rtdecode.errors import ReportError

NOT_AVAILABLE = "not available"
PLOT_WIDTH_PX = 480  # plotting area
PLOT_HEIGHT_PX = 220
MARGIN_LEFT_PX = 70
MARGIN_TOP_PX = 34
MARGIN_BOTTOM_PX = 48
LEGEND_WIDTH_PX = 170
SVG_WIDTH_PX = MARGIN_LEFT_PX + PLOT_WIDTH_PX + LEGEND_WIDTH_PX
SVG_HEIGHT_PX = MARGIN_TOP_PX + PLOT_HEIGHT_PX + MARGIN_BOTTOM_PX
MARKER_MAX_POINTS = 40  # series this short get a dot per point (a single epoch stays visible)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
GUIDE_COLOUR = "#555555"


def finite_number(value: object) -> float | None:
    """A finite number as float, else ``None`` (absent, null, NaN, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def format_number(value: float | None) -> str:
    """A number in at most 4 significant digits; "not available" for ``None``."""
    if value is None:
        return NOT_AVAILABLE
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.4g}"


def _text(value: object) -> str:
    return html.escape(str(value))


@dataclass(frozen=True)
class _Frame:
    """Ranges mapped onto the plotting area (y grows upwards); ``y_ticks`` are the data's own min and max, so tick
    labels read the data (0.7 mm) rather than the padded edge of the frame."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float
    y_ticks: tuple[float, float]

    @classmethod
    def fit(cls, xs: Sequence[float], ys: Sequence[float], y_pad: float = 0.05) -> "_Frame":
        x_min, x_max = _widened(min(xs), max(xs), 0.0)
        y_min, y_max = _widened(min(ys), max(ys), y_pad)
        y_ticks = (min(ys), max(ys)) if max(ys) > min(ys) else (y_min, y_max)
        return cls(x_min, x_max, y_min, y_max, y_ticks)

    def px(self, x: float) -> float:
        return MARGIN_LEFT_PX + (x - self.x_min) / (self.x_max - self.x_min) * PLOT_WIDTH_PX

    def py(self, y: float) -> float:
        return MARGIN_TOP_PX + (self.y_max - y) / (self.y_max - self.y_min) * PLOT_HEIGHT_PX


def _widened(low: float, high: float, pad: float) -> tuple[float, float]:
    """A range ``pad`` (fraction) wider on each side; a single value gets a range around it."""
    if high == low:
        half = abs(low) * 0.1 or 1.0
        return low - half, high + half
    margin = (high - low) * pad
    return low - margin, high + margin


def _finite_points(name: str, xs: Sequence[object], ys: Sequence[object]) -> list[tuple[float, float]]:
    """The ``(x, y)`` pairs of a series where both are finite numbers (NaN, None and inf are skipped)."""
    if len(xs) != len(ys):
        raise ReportError(f"svg_lines: series {name!r} has {len(xs)} x values but {len(ys)} y values")
    points = [(finite_number(x), finite_number(y)) for x, y in zip(xs, ys, strict=True)]
    return [(x, y) for x, y in points if x is not None and y is not None]


def svg_lines(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    hline: float | None = None,
    hline_label: str = "",
) -> str:
    """A line plot as inline SVG: one polyline per non-empty series (non-finite points skipped), dots on short
    series, an optional dashed horizontal line, min/mid/max tick labels, a legend for several series."""
    points = {name: _finite_points(name, xs, ys) for name, (xs, ys) in series.items()}
    xs = [x for pts in points.values() for x, _ in pts]
    level = finite_number(hline)
    if not xs:
        return _empty_plot(title, x_label, y_label)
    ys = [y for pts in points.values() for _, y in pts] + ([level] if level is not None else [])
    frame = _Frame.fit(xs, ys)
    parts = [_svg_open(title), _axes(frame, x_label, y_label)]
    legend: list[tuple[str, str, bool]] = []
    for index, (name, pts) in enumerate(points.items()):
        colour = COLOURS[index % len(COLOURS)]
        legend.append((name, colour, False))
        if pts:
            parts.append(_polyline(frame, pts, colour))
    if level is not None:
        parts.append(_guide_line(frame.px(frame.x_min), frame.py(level), frame.px(frame.x_max), frame.py(level)))
        if hline_label:
            legend.append((hline_label, GUIDE_COLOUR, True))
    if len(legend) > 1:
        parts.append(_legend(legend))
    parts.append("</svg>")
    return "\n".join(parts)


def svg_histogram(
    counts: Sequence[int],
    edges: Sequence[float],
    *,
    title: str,
    x_label: str,
    y_label: str = "voxels",
    vline: float | None = None,
    vline_label: str = "threshold",
) -> str:
    """A histogram as inline SVG: one rect per non-empty bin, an optional dashed vertical line (labelled with its
    value), min/mid/max tick labels; no bins or no counts draws a "no data" note."""
    if len(edges) != len(counts) + 1:
        raise ReportError(
            f"svg_histogram: edges must have one more value than counts; got {len(edges)} edges for "
            f"{len(counts)} counts"
        )
    numbers = [finite_number(count) or 0.0 for count in counts]
    if not numbers or max(numbers) <= 0:
        return _empty_plot(title, x_label, y_label)
    level = finite_number(vline)
    edge_values = [float(edge) for edge in edges]
    frame = _Frame.fit(edge_values + ([level] if level is not None else []), [0.0, max(numbers)], y_pad=0.0)
    parts = [_svg_open(title), _axes(frame, x_label, y_label)]
    for count, left, right in zip(numbers, edge_values[:-1], edge_values[1:], strict=True):
        if count > 0:
            parts.append(_bar(frame, left, right, count))
    if level is not None:
        x_px = frame.px(level)
        parts.append(_guide_line(x_px, frame.py(frame.y_min), x_px, frame.py(frame.y_max)))
        parts.append(_svg_text(x_px + 4, MARGIN_TOP_PX + 12, f"{vline_label} {format_number(level)}", anchor="start"))
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_open(title: str) -> str:
    """The opening ``<svg>`` tag, an accessible ``<title>`` and the visible title."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH_PX}" height="{SVG_HEIGHT_PX}" '
        f'viewBox="0 0 {SVG_WIDTH_PX} {SVG_HEIGHT_PX}" role="img" aria-label="{_text(title)}" '
        'font-family="sans-serif" font-size="11">\n'
        f"<title>{_text(title)}</title>\n"
        + _svg_text(MARGIN_LEFT_PX + PLOT_WIDTH_PX / 2, 18, title, anchor="middle", size_px=14)
    )


def _empty_plot(title: str, x_label: str, y_label: str) -> str:
    """The frame of a plot with a "no data" note in the middle."""
    frame = _Frame(0.0, 1.0, 0.0, 1.0, (0.0, 1.0))
    middle_x, middle_y = MARGIN_LEFT_PX + PLOT_WIDTH_PX / 2, MARGIN_TOP_PX + PLOT_HEIGHT_PX / 2
    return "\n".join(
        [
            _svg_open(title),
            _axis_lines(frame),
            _axis_labels(x_label, y_label),
            _svg_text(middle_x, middle_y, "no data", anchor="middle", size_px=13),
            "</svg>",
        ]
    )


def _axes(frame: _Frame, x_label: str, y_label: str) -> str:
    """Axis lines, tick marks with labels at min, middle and max of x and of the y data, and the axis labels."""
    parts = [_axis_lines(frame)]
    bottom, left = MARGIN_TOP_PX + PLOT_HEIGHT_PX, MARGIN_LEFT_PX
    for fraction in (0.0, 0.5, 1.0):
        x_value = frame.x_min + fraction * (frame.x_max - frame.x_min)
        y_value = frame.y_ticks[0] + fraction * (frame.y_ticks[1] - frame.y_ticks[0])
        x_px, y_px = frame.px(x_value), frame.py(y_value)
        parts.append(_line(x_px, bottom, x_px, bottom + 4, GUIDE_COLOUR))
        parts.append(_svg_text(x_px, bottom + 15, format_number(x_value), anchor="middle"))
        parts.append(_line(left - 4, y_px, left, y_px, GUIDE_COLOUR))
        parts.append(_svg_text(left - 6, y_px + 4, format_number(y_value), anchor="end"))
    parts.append(_axis_labels(x_label, y_label))
    return "\n".join(parts)


def _axis_lines(frame: _Frame) -> str:
    left, right = frame.px(frame.x_min), frame.px(frame.x_max)
    bottom, top = frame.py(frame.y_min), frame.py(frame.y_max)
    return _line(left, bottom, right, bottom, "#000000") + "\n" + _line(left, bottom, left, top, "#000000")


def _axis_labels(x_label: str, y_label: str) -> str:
    """The x label under the axis and the y label rotated along the left edge."""
    x_centre = MARGIN_LEFT_PX + PLOT_WIDTH_PX / 2
    y_centre = MARGIN_TOP_PX + PLOT_HEIGHT_PX / 2
    return (
        _svg_text(x_centre, SVG_HEIGHT_PX - 10, x_label, anchor="middle")
        + "\n"
        + f'<text x="14" y="{y_centre:.1f}" text-anchor="middle" transform="rotate(-90 14 {y_centre:.1f})">'
        f"{_text(y_label)}</text>"
    )


def _polyline(frame: _Frame, points: Sequence[tuple[float, float]], colour: str) -> str:
    """One series: a polyline, plus a dot per point when there are few points."""
    coordinates = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in points)
    parts = [f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="1.5"/>']
    if len(points) <= MARKER_MAX_POINTS:
        parts.extend(
            f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points
        )
    return "\n".join(parts)


def _bar(frame: _Frame, left: float, right: float, count: float) -> str:
    x_px, width_px = frame.px(left), max(frame.px(right) - frame.px(left) - 1.0, 1.0)
    top_px = frame.py(count)
    height_px = frame.py(0.0) - top_px
    return (
        f'<rect class="bar" x="{x_px:.1f}" y="{top_px:.1f}" width="{width_px:.1f}" height="{height_px:.1f}" '
        f'fill="{COLOURS[0]}"><title>{format_number(left)} to {format_number(right)}: {int(count)}</title></rect>'
    )


def _legend(entries: Sequence[tuple[str, str, bool]]) -> str:
    """Legend column right of the plot: a short line in each entry's colour (dashed for guide lines) and its name."""
    x_px = MARGIN_LEFT_PX + PLOT_WIDTH_PX + 12
    parts = []
    for index, (name, colour, dashed) in enumerate(entries):
        y_px = MARGIN_TOP_PX + 8 + 16 * index
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        parts.append(
            f'<line x1="{x_px}" y1="{y_px}" x2="{x_px + 18}" y2="{y_px}" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        parts.append(_svg_text(x_px + 24, y_px + 4, name, anchor="start"))
    return "\n".join(parts)


def _guide_line(x1: float, y1: float, x2: float, y2: float) -> str:
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{GUIDE_COLOUR}" '
        'stroke-width="1.5" stroke-dasharray="4 3"/>'
    )


def _line(x1: float, y1: float, x2: float, y2: float, colour: str) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" stroke-width="1"/>'


def _svg_text(x_px: float, y_px: float, text: str, *, anchor: str, size_px: int | None = None) -> str:
    size = f' font-size="{size_px}"' if size_px else ""
    return f'<text x="{x_px:.1f}" y="{y_px:.1f}" text-anchor="{anchor}"{size}>{_text(text)}</text>'
