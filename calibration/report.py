"""The calibration report: ``report.json`` plus a self-contained ``report.html`` with plots drawn as inline SVG.

The HTML page needs nothing beyond a browser: no plotting library, no JavaScript, no external files, so it can be
copied off the scanner-side machine and opened anywhere. Every section of the report dict is optional except
``subject`` and ``session``; what is absent reads "not available". All text goes through :func:`html.escape`.

The report dict holds JSON values only; :func:`write_report` writes non-finite floats (a NaN loss) as ``null``
so that ``report.json`` is strict JSON, and renders the HTML from that same cleaned dict.
"""

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from rtdecode.errors import CalibrationError
from rtdecode.file_integrity import write_atomically
from rtdecode.svg import NOT_AVAILABLE, svg_histogram, svg_lines
from rtdecode.svg import finite_number as _number
from rtdecode.svg import format_number as _fmt

WORLD_VALUE_MAX_CHARS = 160
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1000px; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
svg { display: block; margin: 0.5em 0 1.5em 0; }
.na { color: #888; font-style: italic; }
"""


# ---------------------------------------------------------------------------------------------------------- files


def write_report(folder: Path, report: Mapping) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``folder`` (created if needed); return their paths.

    Each file is written to a temporary name and renamed, so a reader never sees half a report.
    """
    clean = _json_ready(report, "report")
    html_text = render_html(clean)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_atomically(folder / "report.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")
    html_path = write_atomically(folder / "report.html", html_text)
    return json_path, html_path


def _json_ready(value: object, where: str) -> object:
    """``value`` as plain JSON types: tuples become lists, numpy scalars Python numbers, NaN/inf ``None``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy array or scalar
        return _json_ready(value.tolist(), where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    raise CalibrationError(
        f"calibration report: {where} is a {type(value).__name__} ({value!r:.80}), not a JSON value; "
        "convert it (str for paths, list for arrays) before writing the report"
    )


# ----------------------------------------------------------------------------------------------------------- page


def render_html(report: Mapping) -> str:
    """The calibration report as one self-contained HTML page (inline CSS and SVG, no script)."""
    for key in ("subject", "session"):
        if key not in report:
            raise CalibrationError(f"calibration report: the report has no '{key}'; every report names its {key}")
    sections = [
        _header(report),
        _summary_section(report),
        _motion_section(report.get("motion")),
        _selection_section(report.get("selection")),
        _training_section(report.get("training")),
        _problems_section(report.get("inputs")),
        _world_section(report.get("world")),
        _bundle_section(report.get("bundle")),
    ]
    title = f"Calibration report: subject {report['subject']}, session {report['session']}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _header(report: Mapping) -> str:
    """Title line with subject and session, then the date and the rtdecode version."""
    title = f"Calibration report: subject {report['subject']}, session {report['session']}"
    created = report.get("created", NOT_AVAILABLE)
    version = report.get("rtdecode_version", NOT_AVAILABLE)
    return f"<h1>{_text(title)}</h1>\n<p>Created {_text(created)} by rtdecode {_text(version)}.</p>"


def _summary_section(report: Mapping) -> str:
    """One table with the numbers an operator checks first."""
    inputs = _mapping(report.get("inputs"))
    events = inputs.get("events")
    rows = [
        ("Subject", report["subject"]),
        ("Session", report["session"]),
        ("Raw data folder", inputs.get("raw_dir")),
        ("Events files", f"{len(events)}: " + ", ".join(map(str, events)) if isinstance(events, list) else None),
        ("Stimulus images folder", inputs.get("images_dir")),
        ("Runs", inputs.get("n_runs")),
        ("Volumes", inputs.get("n_volumes")),
        ("Trials", inputs.get("n_trials")),
        ("Training trials", inputs.get("n_train")),
        ("Held-out trials", inputs.get("n_heldout")),
        ("Held-out rule", inputs.get("heldout_rule")),
        ("Betas", inputs.get("betas")),
        ("Motion", _motion_summary(_mapping(report.get("motion")))),
        ("Voxels selected", _selection_summary(_mapping(report.get("selection")))),
        ("Model initialised from", _mapping(report.get("training")).get("init")),
        ("Held-out retrieval", _heldout_summary(_mapping(report.get("heldout")))),
    ]
    return "<h2>Summary</h2>\n" + _table(("Item", "Value"), rows)


def _motion_summary(motion: Mapping) -> str | None:
    """``max FD 0.4 mm; 3 of 600 volumes above 0.5 mm`` or ``None``."""
    runs = [run for run in motion.get("runs", []) if isinstance(run, Mapping)]
    fd_mm = [value for run in runs for value in _finite_list(run.get("fd_mm", []))]
    if not fd_mm:
        return None
    flagged = sum(_number(run.get("n_flagged")) or 0 for run in runs)
    n_volumes = sum(len(run.get("fd_mm", [])) for run in runs)
    threshold = _number(motion.get("fd_threshold_mm"))
    limit = f" above {_fmt(threshold)} mm" if threshold is not None else " flagged"
    return f"max FD {_fmt(max(fd_mm))} mm; {int(flagged)} of {n_volumes} volumes{limit}"


def _selection_summary(selection: Mapping) -> str | None:
    """``8627 of 20000 (reliability)`` or ``None``."""
    n_selected = selection.get("n_selected")
    if n_selected is None:
        return None
    candidates = selection.get("n_candidates")
    of = f" of {candidates} candidates" if candidates is not None else ""
    return f"{n_selected}{of} ({selection.get('method', 'method not recorded')})"


def _heldout_summary(heldout: Mapping) -> str | None:
    """``forward 42.3% ± 3.1%, backward ... (50-way, chance 2.0%, 124 images)`` or ``None``."""
    forward, backward = _number(heldout.get("forward")), _number(heldout.get("backward"))
    if forward is None and backward is None:
        return None
    parts = [
        f"image (brain \u2192 image) {_percent(forward)}{_ci(heldout.get('forward_ci95'))}",
        f"brain (image \u2192 brain) {_percent(backward)}{_ci(heldout.get('backward_ci95'))}",
    ]
    n_way = heldout.get("n_way")
    chance = _number(heldout.get("chance"))
    details = [
        f"{n_way}-way" if n_way is not None else None,
        f"chance {_percent(chance)}" if chance is not None else None,
    ]
    if heldout.get("n_images") is not None:
        details.append(f"{heldout['n_images']} images")
    shown = [item for item in details if item]
    return ", ".join(parts) + (f" ({', '.join(shown)})" if shown else "")


# -------------------------------------------------------------------------------------------------------- motion


def _motion_section(motion: object) -> str:
    """FD per volume (one line per run, threshold line), translations and rotations, and a per-run table."""
    runs = [run for run in _mapping(motion).get("runs", []) if isinstance(run, Mapping)]
    if not runs:
        return f"<h2>Head motion</h2>\n{_na()}"
    threshold = _number(_mapping(motion).get("fd_threshold_mm"))
    fd_series = {f"run {run.get('run', index + 1)}": _indexed(run.get("fd_mm", [])) for index, run in enumerate(runs)}
    fd_plot = svg_lines(
        fd_series,
        title="Framewise displacement",
        x_label="volume in run",
        y_label="FD (mm)",
        hline=threshold,
        hline_label=f"threshold {_fmt(threshold)} mm" if threshold is not None else "",
    )
    volume_index, params = _session_params(runs)
    translation = {f"{axis} (mm)": (volume_index, [row[i] for row in params]) for i, axis in enumerate("xyz")}
    rotation = {
        f"{axis} (deg)": (volume_index, [math.degrees(row[3 + i]) for row in params]) for i, axis in enumerate("xyz")
    }
    rows = [_motion_row(run, index) for index, run in enumerate(runs)]
    return "\n".join(
        [
            "<h2>Head motion</h2>",
            fd_plot,
            svg_lines(translation, title="Translation (runs in order)", x_label="volume in session", y_label="mm"),
            svg_lines(rotation, title="Rotation (runs in order)", x_label="volume in session", y_label="degrees"),
            _table(("Run", "Volumes", "Mean FD (mm)", "Max FD (mm)", "Flagged volumes"), rows),
        ]
    )


def _session_params(runs: Sequence[Mapping]) -> tuple[list[float], list[list[float]]]:
    """Rows of 6 motion parameters (translations mm, rotations rad) of all runs in order, with their session
    volume index; rows that are not 6 numbers are skipped (their index still counts)."""
    volume_index: list[float] = []
    params: list[list[float]] = []
    n_seen = 0
    for run in runs:
        for row in run.get("params", []) or []:
            if isinstance(row, list) and len(row) == 6 and all(_number(value) is not None for value in row):
                volume_index.append(float(n_seen))
                params.append([float(value) for value in row])
            n_seen += 1
    return volume_index, params


def _motion_row(run: Mapping, index: int) -> tuple:
    """One row of the per-run motion table."""
    fd_mm = _finite_list(run.get("fd_mm", []))
    mean = _fmt(sum(fd_mm) / len(fd_mm)) if fd_mm else None
    peak = _fmt(max(fd_mm)) if fd_mm else None
    return (run.get("run", index + 1), len(run.get("fd_mm", []) or []), mean, peak, run.get("n_flagged"))


# ----------------------------------------------------------------------------------------------------- selection


def _selection_section(selection: object) -> str:
    """Reliability histogram with the threshold, or one sentence for a supplied mask."""
    selection = _mapping(selection)
    method = selection.get("method")
    source = selection.get("source", NOT_AVAILABLE)
    n_selected = selection.get("n_selected", NOT_AVAILABLE)
    if method == "mask":
        sentence = f"Voxels come from a supplied mask ({source}): {n_selected} voxels."
        return f"<h2>Voxel selection</h2>\n<p>{_text(sentence)}</p>"
    if method != "reliability":
        return f"<h2>Voxel selection</h2>\n{_na()}"
    threshold = _number(selection.get("threshold"))
    sentence = (
        f"Voxels with repeat reliability above {_fmt(threshold)} "
        f"({selection.get('n_repeated_images', NOT_AVAILABLE)} images shown at least twice): "
        f"{n_selected} of {selection.get('n_candidates', NOT_AVAILABLE)} candidate voxels in {source}."
    )
    histogram = _mapping(selection.get("histogram"))
    if "counts" in histogram and "edges" in histogram:
        plot = svg_histogram(
            histogram["counts"],
            histogram["edges"],
            title="Repeat reliability of candidate voxels",
            x_label="reliability (r)",
            vline=threshold,
        )
    else:
        plot = f"<p>Reliability histogram: {_na()}</p>"
    return f"<h2>Voxel selection</h2>\n<p>{_text(sentence)}</p>\n{plot}"


# ------------------------------------------------------------------------------------------------------ training


def _training_section(training: object) -> str:
    """Total loss per epoch, validation retrieval per epoch with chance, and the last epoch's numbers."""
    training = _mapping(training)
    epochs = [epoch for epoch in training.get("epochs", []) or [] if isinstance(epoch, Mapping)]
    init = f"<p>Initialised from {_text(training.get('init', NOT_AVAILABLE))}.</p>"
    if not epochs:
        return f"<h2>Fine-tuning</h2>\n{init}\n<p>Training curves: {_na()}</p>"
    loss = {"total": _points([(epoch.get("epoch"), _mapping(epoch.get("loss")).get("total")) for epoch in epochs])}
    loss_plot = svg_lines(loss, title="Training loss", x_label="epoch", y_label="total loss")
    retrieval, n_way = _retrieval_series(epochs)
    chance = 1.0 / n_way if n_way else None
    retrieval_plot = svg_lines(
        retrieval,
        title="Validation retrieval (top-1)",
        x_label="epoch",
        y_label="fraction correct",
        hline=chance,
        hline_label=f"chance (1/{n_way})" if n_way else "",
    )
    last = epochs[-1]
    rows = [(name, _fmt(_number(value))) for name, value in _mapping(last.get("loss")).items()]
    rows.append(("learning rate", _fmt(_number(last.get("lr")))))
    table = f"<p>Last epoch ({_text(last.get('epoch', NOT_AVAILABLE))}):</p>\n" + _table(("Quantity", "Value"), rows)
    return "\n".join(["<h2>Fine-tuning</h2>", init, loss_plot, retrieval_plot, table])


def _retrieval_series(epochs: Sequence[Mapping]) -> tuple[dict, int | None]:
    """Series ``<subject> forward/backward`` over epochs, and the n-way of the first validation entry."""
    collected: dict[str, list[tuple[object, object]]] = {}
    n_way = None
    for epoch in epochs:
        for entry in epoch.get("validation", []) or []:
            if not isinstance(entry, Mapping):
                continue
            subject = entry.get("subject", "?")
            for direction in ("forward", "backward"):
                collected.setdefault(f"{subject} {direction}", []).append((epoch.get("epoch"), entry.get(direction)))
            if n_way is None and isinstance(entry.get("n_way"), int) and entry["n_way"] > 0:
                n_way = entry["n_way"]
    return {name: _points(pairs) for name, pairs in collected.items()}, n_way


# ------------------------------------------------------------------------------------------- problems/world/bundle


def _problems_section(inputs: object) -> str:
    """The problems found while reading the session's inputs."""
    problems = _mapping(inputs).get("problems")
    if not isinstance(problems, list):
        return f"<h2>Problems</h2>\n{_na()}"
    if not problems:
        return "<h2>Problems</h2>\n<p>None.</p>"
    items = "\n".join(f"<li>{_text(problem)}</li>" for problem in problems)
    return f"<h2>Problems</h2>\n<ul>\n{items}\n</ul>"


def _world_section(world: object) -> str:
    """The synthetic world's parameters, one row per leaf (nested keys joined with dots); absent for real data."""
    if not isinstance(world, Mapping):
        return ""
    rows = [(key, _short_json(value)) for key, value in _flatten(world, "")]
    return "<h2>Synthetic world (simulated session)</h2>\n" + _table(("Parameter", "Value"), rows)


def _flatten(mapping: Mapping, prefix: str) -> list[tuple[str, object]]:
    """``(dotted key, leaf value)`` for every non-mapping value of a nested mapping."""
    leaves: list[tuple[str, object]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        leaves.extend(_flatten(value, name + ".") if isinstance(value, Mapping) else [(name, value)])
    return leaves


def _short_json(value: object) -> str:
    """Compact JSON text of ``value``, cut at ``WORLD_VALUE_MAX_CHARS`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= WORLD_VALUE_MAX_CHARS else text[: WORLD_VALUE_MAX_CHARS - 1] + "\u2026"


def _bundle_section(bundle: object) -> str:
    """Where the subject bundle was written and what it holds."""
    bundle = _mapping(bundle)
    if not bundle:
        return f"<h2>Subject bundle</h2>\n{_na()}"
    folder = f"<p>Folder: {_text(bundle.get('folder', NOT_AVAILABLE))}</p>"
    files = _mapping(bundle.get("files"))
    table = _table(("Name", "File"), list(files.items())) if files else f"<p>Files: {_na()}</p>"
    return f"<h2>Subject bundle</h2>\n{folder}\n{table}"


# ------------------------------------------------------------------------------------------------ html helpers


def _text(value: object) -> str:
    """Escaped text of any value."""
    return html.escape(str(value))


def _na() -> str:
    return f'<p class="na">{NOT_AVAILABLE}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; ``None`` cells read "not available"."""
    head = "".join(f"<th>{_text(name)}</th>" for name in header)
    body = "\n".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _cell(value: object) -> str:
    if value is None:
        return f'<td class="na">{NOT_AVAILABLE}</td>'
    return f"<td>{_text(value)}</td>"


def _mapping(value: object) -> Mapping:
    """``value`` if it is a mapping, else an empty one (an absent or malformed section)."""
    return value if isinstance(value, Mapping) else {}


def _finite_list(values: object) -> list[float]:
    return [number for number in map(_number, values or []) if number is not None] if isinstance(values, list) else []


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{100.0 * value:.1f}%"


def _ci(value: object) -> str:
    number = _number(value)
    return "" if number is None else f" \u00b1 {100.0 * number:.1f}%"


def _indexed(values: object) -> tuple[list[float], list[object]]:
    """``(0, 1, 2, ...)`` against ``values``."""
    values = values if isinstance(values, list) else []
    return [float(index) for index in range(len(values))], values


def _points(pairs: Sequence[tuple[object, object]]) -> tuple[list[object], list[object]]:
    return [x for x, _ in pairs], [y for _, y in pairs]
