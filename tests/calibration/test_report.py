"""The calibration report: well-formed self-contained HTML with inline SVG plots, escaped text, skipped NaN points,
and a JSON file that round-trips."""

import json
import math
from html.parser import HTMLParser

import pytest

from calibration.report import render_html, write_report
from rtdecode.errors import CalibrationError, ReportError
from rtdecode.svg import svg_histogram, svg_lines

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class TagChecker(HTMLParser):
    """Counts start tags and checks that every opened non-void tag is closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open_tags: list[str] = []
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in VOID_TAGS:
            self.open_tags.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if not self.open_tags or self.open_tags[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open_tags[-1:] or 'nothing'}")
            return
        self.open_tags.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.open_tags == [], (checker.errors, checker.open_tags)
    return checker


def full_report() -> dict:
    epochs = [
        {
            "epoch": epoch,
            "loss": {"total": 3.0 - 0.4 * epoch, "prior": 1.0 - 0.1 * epoch, "contrastive": 2.0 - 0.3 * epoch},
            "lr": 3e-4,
            "validation": [
                {"subject": "new01", "forward": 0.1 + 0.1 * epoch, "backward": 0.08 + 0.1 * epoch, "n_way": 50}
            ],
        }
        for epoch in range(4)
    ]
    return {
        "subject": "new01",
        "session": 1,
        "created": "2026-11-24T10:00:00+00:00",
        "rtdecode_version": "0.1.0",
        "inputs": {
            "raw_dir": "/data/new01/ses-1",
            "events": ["run-1_events.tsv", "run-2_events.tsv"],
            "images_dir": "/data/stimuli",
            "n_runs": 2,
            "n_volumes": 380,
            "n_trials": 126,
            "n_train": 100,
            "n_heldout": 26,
            "heldout_rule": "images shown twice",
            "betas": "online",
            "problems": ["run 2: volume 17 missing", "stimulus <script>alert(1)</script> not found"],
        },
        "motion": {
            "fd_threshold_mm": 0.5,
            "runs": [
                {
                    "run": 1,
                    "fd_mm": [0.0, 0.1, 0.7, 0.2],
                    "params": [[0.1 * i, 0, 0, 0, 0, 0.001] for i in range(4)],
                    "n_flagged": 1,
                },
                {
                    "run": 2,
                    "fd_mm": [0.0, 0.2, 0.1],
                    "params": [[0, 0.2 * i, 0, 0.002, 0, 0] for i in range(3)],
                    "n_flagged": 0,
                },
            ],
        },
        "selection": {
            "method": "reliability",
            "source": "brain mask",
            "n_candidates": 5000,
            "n_selected": 812,
            "threshold": 0.31,
            "n_repeated_images": 60,
            "histogram": {"counts": [0, 10, 400, 3000, 1200, 300, 90, 0], "edges": [-1 + 0.25 * i for i in range(9)]},
        },
        "training": {"init": "multisubject_v1/last.pth", "epochs": epochs},
        "heldout": {
            "forward": 0.4231,
            "backward": 0.3987,
            "n_way": 50,
            "chance": 0.02,
            "n_images": 26,
            "forward_ci95": 0.031,
            "backward_ci95": 0.029,
        },
        "world": {"n_voxels": 5000, "noise": {"sd": 1.2, "drift": 0.01}, "seed": 7},
        "bundle": {"folder": "/home/rt/subjects/new01", "files": {"model": "model.safetensors", "mask": "mask.nii.gz"}},
    }


def test_full_report_has_every_plot_and_the_numbers():
    page = render_html(full_report())
    checker = parsed(page)
    # FD, translation, rotation, reliability histogram, training loss, validation retrieval
    assert checker.counts["svg"] == 6
    # FD: 2 runs; translation: 3; rotation: 3; loss: 1; retrieval: forward + backward
    assert checker.counts["polyline"] == 11
    assert page.count('class="bar"') == 6  # the non-empty bins
    assert page.startswith("<!DOCTYPE html>")
    for text in ("42.3% \u00b1 3.1%", "39.9%", "50-way", "chance 2.0%", "812 of 5000", "new01", "max FD 0.7 mm"):
        assert text in page, text
    assert "threshold 0.31" in page and "chance (1/50)" in page
    assert "noise.sd" in page and "model.safetensors" in page
    assert "<script" not in page.lower()
    assert "stimulus &lt;script&gt;alert(1)&lt;/script&gt; not found" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # no external resources
    assert "not available" not in page


def test_almost_empty_report_says_not_available():
    page = render_html({"subject": "new02", "session": 3})
    checker = parsed(page)
    assert checker.counts.get("svg", 0) == 0 and checker.counts.get("polyline", 0) == 0
    assert "subject new02, session 3" in page
    assert page.count("not available") >= 10
    assert "Synthetic world" not in page


def test_mask_selection_is_a_sentence_not_a_histogram():
    report = {
        "subject": "s",
        "session": 1,
        "selection": {"method": "mask", "source": "posterior.nii.gz", "n_selected": 900},
    }
    page = render_html(report)
    assert "supplied mask (posterior.nii.gz): 900 voxels" in page
    assert "<svg" not in page


def test_nan_points_are_skipped_and_single_points_drawn():
    plot = svg_lines(
        {"a": ([0, 1, 2, 3], [1.0, math.nan, 2.0, None]), "b": ([5], [0.5])},
        title="t",
        x_label="x",
        y_label="y",
        hline=1.5,
        hline_label="limit",
    )
    checker = parsed(plot)
    assert checker.counts["polyline"] == 2
    points = [line.split('points="')[1].split('"')[0] for line in plot.splitlines() if "<polyline" in line]
    assert [len(p.split()) for p in points] == [2, 1]
    assert checker.counts["circle"] == 3
    assert "nan" not in plot.lower()
    assert {"a", "b", "limit"} <= {text.strip() for text in checker.text}  # the legend


def test_empty_series_and_empty_histogram_draw_a_no_data_note():
    for plot in (
        svg_lines({"a": ([], []), "b": ([1.0], [math.nan])}, title="t", x_label="x", y_label="y"),
        svg_histogram([0, 0], [0.0, 0.5, 1.0], title="h", x_label="r", vline=0.2),
        svg_histogram([], [0.0], title="h", x_label="r"),
    ):
        checker = parsed(plot)
        assert "no data" in checker.text
        assert "polyline" not in checker.counts and "rect" not in checker.counts


def test_plot_ticks_show_min_and_max_and_text_is_escaped():
    plot = svg_lines({"<b>": ([2.0, 10.0], [-3.0, 7.0]), "c": ([2.0], [0.0])}, title="a & b", x_label="x", y_label="y")
    checker = parsed(plot)
    labels = {text.strip() for text in checker.text}
    assert {"2", "10", "<b>", "a & b"} <= labels
    assert "&lt;b&gt;" in plot and "a &amp; b" in plot


def test_histogram_checks_edges():
    with pytest.raises(ReportError, match="one more value than counts"):
        svg_histogram([1, 2], [0.0, 1.0], title="h", x_label="r")


def test_write_report_writes_both_files_and_the_json_round_trips(tmp_path):
    report = full_report()
    json_path, html_path = write_report(tmp_path / "out", report)
    assert (json_path.name, html_path.name) == ("report.json", "report.html")
    assert json.loads(json_path.read_text(encoding="utf-8")) == report
    assert html_path.read_text(encoding="utf-8") == render_html(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json"]


def test_write_report_stores_nan_as_null_and_rejects_non_json(tmp_path):
    report = full_report()
    report["training"]["epochs"][2]["loss"]["total"] = math.nan
    json_path, html_path = write_report(tmp_path, report)
    text = json_path.read_text(encoding="utf-8")
    assert "NaN" not in text
    assert json.loads(text)["training"]["epochs"][2]["loss"]["total"] is None
    loss_plot = [block for block in html_path.read_text(encoding="utf-8").split("<svg") if "Training loss" in block]
    assert len(loss_plot[0].split('<polyline points="')[1].split('"')[0].split()) == 3
    with pytest.raises(CalibrationError, match=r"report.bundle.folder is a PosixPath"):
        write_report(tmp_path, {"subject": "s", "session": 1, "bundle": {"folder": tmp_path}})


def test_subject_and_session_are_required():
    with pytest.raises(CalibrationError, match="no 'session'"):
        render_html({"subject": "new01"})
