"""``rtdecode calibrate`` end to end on a simulated DICOM session: the bundle, the live betas, resume.

One module-scoped calibration (the real command, in a subprocess) serves the tests below; it takes about half a
minute on 2 cores (4 runs of 188 mosaic volumes, motion correction, the GLM, a 3-epoch tiny fine-tune).
"""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from rtdecode.betas import SessionBetas, read_events
from rtdecode.config import GlmConfig, ScannerConfig
from rtdecode.ingest.pipeline import Ingestor
from rtdecode.preprocess.motion import MotionCorrector
from rtdecode.records import Volume
from rtdecode.subject_bundle import load_subject_bundle
from tests.calibration.session_fixture import SUBJECT, cli_env, config_values, write_config_toml, write_session
from tests.helpers import run_rtdecode, stop_and_drain


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    session = write_session(root / "session")
    home = root / "home"
    config = write_config_toml(root / "config.toml", config_values(home, session))
    result = run_rtdecode(
        "--config", str(config), "calibrate", "--subject", SUBJECT, "--session", "1", env=cli_env(home), timeout_s=600
    )
    work = home / "subjects" / SUBJECT / "sessions" / "ses-01" / "calibration"
    return {"root": root, "session": session, "home": home, "config": config, "work": work, "result": result}


def test_the_bundle_is_complete_loadable_and_consistent(calibrated):
    bundle = load_subject_bundle(calibrated["home"] / "subjects" / SUBJECT / "bundle")
    assert bundle.subject == SUBJECT and bundle.manifest["session"] == 1
    assert bundle.manifest["betas"] == "online"
    assert bundle.manifest["glm"] == GlmConfig().model_dump(mode="json")
    assert bundle.model.config.subjects == (SUBJECT,)
    assert bundle.model.config.n_voxels == (bundle.mask.n_voxels,) == (bundle.zscore.n_voxels,)
    assert bundle.zscore.method == "calibration"
    truth = nib.load(calibrated["session"].region_mask_path)
    assert bundle.mask.shape == truth.shape and np.allclose(bundle.mask.affine, truth.affine, atol=1e-4)
    region = np.asarray(truth.dataobj) > 0
    near_region = scipy.ndimage.binary_dilation(region)  # motion correction blurs the region's edge by a voxel
    inside = int((bundle.mask.data & near_region).sum())
    assert bundle.mask.n_voxels >= 10
    assert inside >= 0.9 * bundle.mask.n_voxels, (inside, bundle.mask.n_voxels)  # the selection found the signal
    out = calibrated["result"].stdout
    assert "held-out retrieval (60-way top-1)" in out and "subject bundle:" in out


def test_the_report_has_every_section(calibrated):
    bundle_dir = calibrated["home"] / "subjects" / SUBJECT / "bundle"
    report = json.loads((bundle_dir / "report.json").read_text())
    assert report["inputs"]["n_runs"] == 4 and report["inputs"]["n_heldout"] == 180
    assert report["inputs"]["n_train"] == 60 and report["inputs"]["heldout_rule"] == "marked"
    assert [run["run"] for run in report["motion"]["runs"]] == [1, 2, 3, 4]
    assert all(len(run["fd_mm"]) == 188 for run in report["motion"]["runs"])
    assert report["selection"]["method"] == "reliability"
    assert len(report["training"]["epochs"]) == 3
    assert report["heldout"]["n_way"] == 60
    html = (bundle_dir / "report.html").read_text()
    assert html.count("<svg") >= 4


def test_a_replayed_run_gives_the_calibration_betas(calibrated, tmp_path):
    """Run 3's files through the live chain with the bundle's mask, reference and statistics, each event arriving
    only once its onset has been acquired (as a stimulus program logs it live): the online betas are the betas
    calibration trained on (z-scored, the same trials)."""
    bundle = load_subject_bundle(calibrated["home"] / "subjects" / SUBJECT / "bundle", load_model=False)
    replay = tmp_path / "replay"
    replay.mkdir()
    for path in calibrated["session"].raw_dir.glob("001_000003_*.dcm"):
        shutil.copy(path, replay / path.name)
    chain = SessionBetas(
        MotionCorrector(bundle.mask, bundle.reference, device="cpu"), GlmConfig(), zscore=bundle.zscore
    )
    pending = sorted(read_events([calibrated["session"].events[2]])[1], key=lambda event: event.onset_s)
    live = {}
    ingestor = Ingestor(replay, ScannerConfig(), tmp_path / "quarantine").start()
    for item in stop_and_drain(ingestor):
        if not isinstance(item, Volume):
            continue
        acquired_s = (item.volume_index + 1) * item.tr_s
        arrived = [event for event in pending if event.onset_s <= acquired_s]
        pending = pending[len(arrived) :]
        for beta in chain.add_events(1, arrived) + chain.add_volume(item):
            live[beta.event.trial_id] = beta.zscored
    trained = _training_rows(calibrated["work"], run=3)
    assert len(trained) >= 50 and set(live) == set(trained)
    for trial_id, row in trained.items():
        np.testing.assert_allclose(live[trial_id], row, rtol=1e-4, atol=1e-4, err_msg=trial_id)


def _training_rows(work, run: int) -> dict[str, np.ndarray]:
    folder = work / "session" / SUBJECT / "ses-01"
    betas = np.load(folder / "betas.npy")
    lines = (folder / "trials.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = {}
    for line in lines[1:]:
        fields = dict(zip(header, line.split("\t"), strict=True))
        if int(fields["run"]) == run:
            rows[fields["trial_id"].split("_", 1)[1]] = betas[int(fields["row"])]
    return rows


def test_an_interrupted_calibration_resumes(calibrated):
    """A lost run cache and a lost model: the rerun recomputes that run only and continues the fine-tune."""
    work = calibrated["work"]
    (work / "runs" / "run-02.npz").unlink()
    shutil.rmtree(work / "train-scratch" / "model")
    before = load_subject_bundle(calibrated["home"] / "subjects" / SUBJECT / "bundle", load_model=False)
    result = run_rtdecode(
        "--config",
        str(calibrated["config"]),
        "calibrate",
        "--subject",
        SUBJECT,
        env=cli_env(calibrated["home"]),
        timeout_s=600,
    )
    assert "runs [1, 3, 4] from the cache" in result.stderr
    assert "resumed from" in result.stderr and "epoch 3 done" in result.stderr
    after = load_subject_bundle(calibrated["home"] / "subjects" / SUBJECT / "bundle", load_model=False)
    assert np.array_equal(after.mask.data, before.mask.data)
    np.testing.assert_array_equal(after.zscore.mean, before.zscore.mean)
    replaced = list((calibrated["home"] / "subjects" / SUBJECT).glob("bundle-replaced-*"))
    assert len(replaced) == 1  # the earlier bundle is kept, not deleted
