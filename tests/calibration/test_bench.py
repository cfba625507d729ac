"""``rtdecode bench calibrate --quick``: the whole comparison runs (pretrain, simulated DICOM session, calibrate
from the pretrained model and from scratch). The quick world is too small for its numbers to mean anything, so
only the pipeline and the report are checked here; the figures come from the full benchmark."""

import json
import os

from tests.helpers import run_rtdecode


def test_bench_calibrate_quick_runs_both_arms(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RTDECODE_HOME": str(tmp_path / "home"), "RTDECODE_CONFIG": ""}
    out = tmp_path / "bench"
    result = run_rtdecode(
        "--log-level", "WARNING", "bench", "calibrate", "--quick", "--out", str(out), env=env, timeout_s=600
    )
    text = result.stdout
    assert text.count("pretrained: 40-way top-1") == 2 and text.count("scratch: 40-way top-1") == 2  # final, online
    assert (
        "ratio pretrained / scratch (brain->image)" in text and "signal_sd / noise_sd / ar1: [2.0, 12.0, 0.3]" in text
    )
    reports = {
        path.parent.name: json.loads(path.read_text()) for path in (out / "calibration-final").glob("*/report.json")
    }
    names = sorted(reports)
    assert len(names) == 2 and names[0].startswith("report-pretrained-") and names[1] == "report-scratch"
    pretrained = next(r for name, r in reports.items() if name.startswith("report-pretrained-"))
    assert pretrained["training"]["init"] == str(out / "pretrain" / "model")
    assert reports["report-scratch"]["training"]["init"] == "scratch"
    assert pretrained["selection"]["method"] == "mask" and pretrained["selection"]["n_selected"] == 290
    assert pretrained["inputs"]["n_heldout"] == 40 and pretrained["world"]["calibrated"] == "syn08"
    assert pretrained["inputs"]["betas"] == "final"
    online = json.loads((out / "calibration-online" / "report-scratch" / "report.json").read_text())
    assert online["inputs"]["betas"] == "online"
