"""The evaluation report: ``evaluation.json`` and ``evaluation.html`` in one folder.

The page has the metrics table next to MindEye2's Table 1 rows (40 sessions and 1 hour), the retrieval figures
with their 95% intervals, a grid of reconstructions under the images that were seen (thumbnails written beside the
page, so it opens from disk), and one histogram per metric of its per-pair values.
"""

import html
import json
import os
from pathlib import Path

import numpy as np

from rtdecode.evaluate.evaluation import Evaluation
from rtdecode.evaluate.metrics import METRICS, PAPER_1_HOUR, PAPER_40_SESSIONS
from rtdecode.file_integrity import write_atomically
from rtdecode.svg import NOT_AVAILABLE, format_number, svg_histogram

THUMBNAIL_PX = 128
MAX_GRID_PAIRS = 60
N_BINS = 20
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; }
.na { color: #888; font-style: italic; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
.pair { text-align: center; font-size: 11px; }
.pair img { display: block; width: 96px; height: 96px; }
svg { display: block; margin: 0.5em 0 1.5em 0; }
"""


def write_report(folder: Path, evaluation: Evaluation, pairs=None, *, title: str = "rtdecode evaluation") -> tuple:
    """Write ``evaluation.json`` and ``evaluation.html`` (and the grid's thumbnails when ``pairs`` are given) into
    ``folder``; return the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "evaluation.json", folder / "evaluation.html"
    write_atomically(json_path, json.dumps(evaluation.to_json(), indent=1, allow_nan=False) + "\n")
    grid = _grid(folder, pairs) if pairs is not None else ""
    write_atomically(html_path, render_html(evaluation, title=title, grid=grid))
    return json_path, html_path


def render_html(evaluation: Evaluation, *, title: str, grid: str = "") -> str:
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(evaluation.ids)} pairs of reconstruction and seen image.</p>",
        "<h2>Metrics</h2>",
        _metrics_table(evaluation),
        _retrieval_text(evaluation),
        _captions_table(evaluation),
        _undefined(evaluation),
        _not_computed(evaluation),
        grid,
        _histograms(evaluation),
    ]
    body = "\n".join(section for section in sections if section)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def _metrics_table(evaluation: Evaluation) -> str:
    header = "".join(
        f"<th>{name}</th>"
        for name in ("metric", "kind", "better", "this", "chance", "MindEye2, 40 sessions", "MindEye2, 1 hour")
    )
    rows = [
        f"<tr><td>{html.escape(spec.label)}</td><td>{spec.group}</td>"
        f"<td>{'higher' if spec.higher_is_better else 'lower'}</td>{_number_cell(evaluation.value(spec.name))}"
        f"{_number_cell(_chance(evaluation, spec))}{_number_cell(PAPER_40_SESSIONS[spec.name])}"
        f"{_number_cell(PAPER_1_HOUR[spec.name])}</tr>"
        for spec in METRICS
    ]
    return f"<table>\n<tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>"


def _chance(evaluation: Evaluation, spec) -> float | None:
    """The metric's chance level; for retrieval the n-way actually scored (fewer items than 300 raise it)."""
    if spec.group == "retrieval" and evaluation.retrieval is not None:
        return evaluation.retrieval.chance
    return spec.chance


def _number_cell(value: float | None) -> str:
    if value is None:
        return f'<td class="na">{NOT_AVAILABLE}</td>'
    return f"<td>{html.escape(format_number(value))}</td>"


def _retrieval_text(evaluation: Evaluation) -> str:
    scores = evaluation.retrieval
    if scores is None:
        return ""
    return (
        f"<p>Retrieval: {scores.n_way}-way top-1 over {scores.n_draws} random draws (chance {scores.chance:.4f}): "
        f"image (brain &rarr; image) {scores.forward:.3f} &plusmn; {scores.forward_ci95:.3f}, "
        f"brain (image &rarr; brain) {scores.backward:.3f} &plusmn; {scores.backward_ci95:.3f} (95% intervals).</p>"
    )


def _captions_table(evaluation: Evaluation) -> str:
    if not evaluation.captions:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>{_number_cell(value['mean'])}</tr>"
        for name, value in evaluation.captions.items()
    )
    return f"<h2>Captions</h2>\n<table>\n<tr><th>metric</th><th>mean</th></tr>\n{rows}\n</table>"


def _undefined(evaluation: Evaluation) -> str:
    counts = [(metric.label, metric.n_undefined) for metric in evaluation.metrics if metric.n_undefined]
    if not counts:
        return ""
    text = ", ".join(f"{label}: {n}" for label, n in counts)
    return f"<p>Pairs where a metric is undefined (a constant picture has no correlation), not in the mean: {text}.</p>"


def _not_computed(evaluation: Evaluation) -> str:
    if not evaluation.not_computed:
        return ""
    items = "".join(
        f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, reason in evaluation.not_computed.items()
    )
    return f"<h3>Not computed</h3><ul>{items}</ul>"


def _grid(folder: Path, pairs) -> str:
    """Thumbnails of the first pairs: the seen image above its reconstruction."""
    pictures = folder / "pictures"
    pictures.mkdir(exist_ok=True)
    cells = []
    for index, stem in enumerate(pairs.ids[:MAX_GRID_PAIRS]):
        seen = _thumbnail(pairs.images[index], pictures / f"{index:04d}-seen.jpg")
        recon = _thumbnail(pairs.recons[index], pictures / f"{index:04d}-recon.jpg")
        cells.append(
            f'<div class="pair"><img src="{_relative(seen, folder)}" alt="seen {html.escape(stem)}">'
            f'<img src="{_relative(recon, folder)}" alt="reconstruction {html.escape(stem)}">{html.escape(stem)}</div>'
        )
    shown = f"the first {MAX_GRID_PAIRS} of {len(pairs.ids)}" if len(pairs.ids) > MAX_GRID_PAIRS else "all"
    return f'<h2>Seen (top) and reconstructed (bottom): {shown}</h2>\n<div class="grid">{"".join(cells)}</div>'


def _thumbnail(image, path: Path) -> Path:
    from PIL import Image

    pixels = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.BILINEAR).save(path, quality=90)
    return path


def _histograms(evaluation: Evaluation) -> str:
    plots = []
    for metric in evaluation.metrics:
        values = np.asarray(metric.per_item, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            continue
        counts, edges = np.histogram(values, bins=N_BINS)
        plots.append(
            svg_histogram(
                counts.tolist(),
                edges.tolist(),
                title=f"{metric.label}: each pair",
                x_label=metric.label,
                y_label="pairs",
                vline=metric.value,
                vline_label="mean",
            )  # fmt: skip
        )
    return "<h2>Per-pair values</h2>\n" + "\n".join(plots) if plots else ""


def _relative(path: Path, folder: Path) -> str:
    return html.escape(os.path.relpath(path, folder))
