"""The end of ``rtdecode demo``: score what the display received against the simulation's truth, write the
gallery page, print the summary.

Scored from files, not from memory: ``display/trials.jsonl`` (what ``rtdecode view --save`` wrote from the
stream, read with :func:`rtdecode.view.save.read_saved_trials`: each trial's retrieval matches, best first)
against ``session/truth/truth.json`` (what the simulated stimulus program showed), so the numbers are the ones
anyone can recompute from the demo's folder.
"""

import dataclasses
import html
import json
import os
from pathlib import Path

from rtdecode.evaluate.ranked import TopK, top_k

TOP_K = 5  # the "top-5" of the summary and the number of matches the gallery shows


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """The summary's numbers."""

    n_volumes: int
    n_trials: int
    retrieval: TopK
    heldout: dict | None  # the bundle's calibration figure (bundle.json "heldout")
    latency: list[dict]
    problems: list[str]
    display_dir: Path
    gallery: Path


def read_truth(truth_path: Path) -> dict[tuple[int, str], str]:
    """(run, trial id) -> the stimulus the simulated participant saw."""
    truth = json.loads(truth_path.read_text())
    return {(int(trial["run"]), str(trial["trial_id"])): str(trial["stimulus_id"]) for trial in truth["trials"]}


def score(trials: dict[tuple[int, str], dict], truth: dict[tuple[int, str], str], pool_size: int) -> TopK:
    """Top-1 / top-5 hits of every decoded trial (one with retrieval matches) against the truth."""
    ranked = {key: [match["id"] for match in trial.get("matches") or []] for key, trial in trials.items()}
    return top_k(ranked, truth, pool_size, k=TOP_K)


def write_gallery(
    trials: dict[tuple[int, str], dict], truth: dict[tuple[int, str], str], stimuli_dir: Path, out_path: Path
) -> Path:
    """An HTML page: per trial, the picture shown and the decoder's top-k pictures of the pool, the right one
    outlined."""
    rows = [_gallery_row(key, trials[key], truth.get(key), stimuli_dir, out_path.parent) for key in sorted(trials)]
    page = _GALLERY_PAGE.format(k=TOP_K, rows="\n".join(rows))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page)
    return out_path


def _gallery_row(key: tuple[int, str], trial: dict, seen_id: str | None, stimuli_dir: Path, page_dir: Path) -> str:
    run, trial_id = key
    matches = (trial.get("matches") or [])[:TOP_K]
    cells = [_picture(seen_id, stimuli_dir, page_dir, "seen", css="seen")]
    for match in matches:
        css = "hit" if match["id"] == seen_id else ""
        cells.append(_picture(match["id"], stimuli_dir, page_dir, f"{float(match['score']):.3f}", css=css))
    label = html.escape(f"run {run} · {trial_id}")
    return f"<tr><th>{label}</th>{''.join(cells)}</tr>"


def _picture(stimulus_id: str | None, stimuli_dir: Path, page_dir: Path, note: str, css: str) -> str:
    if stimulus_id is None:
        return f'<td class="{css}">unknown<br>{html.escape(note)}</td>'
    path = stimuli_dir / f"{stimulus_id}.png"
    name = html.escape(stimulus_id)
    image = f'<img src="{html.escape(os.path.relpath(path, page_dir))}" alt="{name}">' if path.is_file() else ""
    return f'<td class="{css}">{image}<br>{name}<br>{html.escape(note)}</td>'


_GALLERY_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rtdecode demo: gallery</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
td, th {{ padding: 4px; text-align: center; font-size: 12px; vertical-align: top; }}
img {{ width: 64px; height: 64px; image-rendering: pixelated; }}
td.seen {{ background: #eef; }}
td.hit img {{ outline: 3px solid #2a2; }}
</style></head><body>
<h1>rtdecode demo: what each trial decoded to</h1>
<p>Each row: the picture the simulated participant saw, then the decoder's {k} closest pictures of the retrieval
pool with their cosine scores, best first. The right picture, when among them, is outlined in green.</p>
<table>
{rows}
</table></body></html>
"""


def summary(result: DemoResult, built: str, wall_s: float, faults: tuple[str, ...]) -> str:
    """The demo's closing report."""
    lines = [
        "",
        "summary",
        f"  volumes processed: {result.n_volumes} (faults injected: {', '.join(faults)})",
        f"  trials decoded: {result.retrieval.n_scored} of {result.n_trials} logged",
        *_retrieval_lines(result.retrieval, result.heldout),
        "  images: none generated. The demo model's image space is a random-weight CLIP tower (no weights can be",
        "    downloaded) that no image generator was trained on, so the demo decodes to retrieval: each trial's",
        "    closest pictures of the pool. With real weights, rtdecode serve also generates images.",
        "  latency per stage, as the display measured it (median / p95 ms):",
    ]
    for row in result.latency:
        lines.append(f"    {row['label']:<28s} {row['median_ms']:8.1f} {row['p95_ms']:8.1f}  (n={row['n']})")
    if result.problems:
        lines.append(f"  problems the display showed ({len(result.problems)}), newest first:")
        lines += [f"    {text}" for text in result.problems[:8]]
    lines.append(f"  model: {built}; total {wall_s:.0f} s")
    lines.append(f"  gallery (each trial's seen picture beside its top-{TOP_K}): {result.gallery}")
    lines.append(f"  everything the display received: {result.display_dir}")
    return "\n".join(lines)


def _retrieval_lines(retrieval: TopK, heldout: dict | None) -> list[str]:
    lines = [f"  retrieval against the simulation's truth, among the {retrieval.pool_size} pictures in the pool:"]
    for label, n_hits, k in (("top-1", retrieval.n_top1, 1), (f"top-{TOP_K}", retrieval.n_topk, TOP_K)):
        rate = n_hits / max(1, retrieval.n_scored)
        lines.append(
            f"    {label} {n_hits}/{retrieval.n_scored} = {rate:.3f} (chance {retrieval.chance(k):.3f}; "
            f"p = {retrieval.p_value(n_hits, k):.1e} by chance)"
        )
    if heldout:
        lines.append(
            f"    for comparison, calibration's held-out top-1: {float(heldout['forward']):.3f} "
            f"{heldout['n_way']}-way (chance {float(heldout['chance']):.3f}; its own session's test images)"
        )
    return lines
