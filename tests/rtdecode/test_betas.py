"""One definition of a beta: ``rtdecode preprocess`` over recorded files, and the same chain fed live
(real inotify, events appended to a growing events.tsv while volumes land), give the same betas."""

import json
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from rtdecode.betas import SessionBetas
from rtdecode.cli import main
from rtdecode.config import GlmConfig, ScannerConfig
from rtdecode.glm.events import EventsTsv
from rtdecode.glm.normalise import ZScore
from rtdecode.ingest.pipeline import END, Ingestor
from rtdecode.preprocess.mask import Mask
from rtdecode.preprocess.motion import MotionCorrector
from rtdecode.records import Volume
from rtdecode.sim.nifti_writer import encode_nifti_volume
from rtdecode.sim.phantom import BrainPhantom
from rtdecode.sim.sources import SyntheticRun
from rtdecode.sim.trials import realtime_3t_design, trial_responses

SHAPE = (41, 52, 42)
N_VOXELS = 400
N_VOLUMES = 70
SLOPE = 0.05


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A run on disk: NIfTI volumes with known motion and trial responses, events.tsv, mask, reference."""
    root = tmp_path_factory.mktemp("recorded")
    design = realtime_3t_design(seed=3, n_trials=8, n_volumes=N_VOLUMES)
    affine = SyntheticRun(shape=SHAPE, voxel_mm=2.5).affine
    phantom = BrainPhantom(SHAPE, affine, seed=4)
    mask = phantom.region_mask(N_VOXELS)
    rng = np.random.default_rng(5)
    betas = rng.normal(40.0, 20.0, (design.n_trials, N_VOXELS))
    signal = trial_responses(design) @ betas
    motion = np.cumsum(rng.normal(0, 0.03, (N_VOLUMES, 6)), axis=0) * np.array([1, 1, 1, 0.01, 0.01, 0.01])
    raw = root / "raw"
    raw.mkdir()
    for t in range(N_VOLUMES):
        volume = phantom.moved(motion[t], noise_sd=4.0, rng=rng)
        volume[mask] += signal[t]  # the response stays in scanner space; motion is small
        stored = np.clip(np.rint(volume / SLOPE), 0, 65535).astype(np.uint16)
        payload = encode_nifti_volume(
            stored, affine, design.tr_s, 7, t + 1, 36000.0 + t * design.tr_s, (SLOPE, 0), False
        )
        (raw / f"vol_{t + 1:04d}.nii").write_bytes(payload)
    lines = ["onset\tduration\tstim_file"] + [
        f"{onset:.3f}\t{duration:.1f}\t{stimulus}"
        for onset, duration, stimulus in zip(design.onsets_s, design.durations_s, design.stimulus_ids, strict=True)
    ]
    (root / "events.tsv").write_text("\n".join(lines) + "\n")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), root / "mask.nii.gz")
    nib.save(nib.Nifti1Image(phantom.data, affine), root / "reference.nii.gz")
    return {"root": root, "raw": raw, "design": design, "betas": betas, "motion": motion, "mask": mask}


@pytest.fixture(scope="module")
def offline(recorded):
    root = recorded["root"]
    args = ["--set", "glm.noise_model='ar1'", "preprocess", str(recorded["raw"]), "--events", str(root / "events.tsv")]
    args += [
        "--mask",
        str(root / "mask.nii.gz"),
        "--reference",
        str(root / "reference.nii.gz"),
        "--out",
        str(root / "out"),
    ]
    assert main(args) == 0
    with np.load(root / "out" / "betas.npz", allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def test_offline_betas_track_the_truth_and_every_file_is_written(recorded, offline):
    out = recorded["root"] / "out"
    design = recorded["design"]
    assert list(offline["trial_ids"]) == [str(k) for k in range(1, design.n_trials + 1)]
    assert list(offline["stimulus_ids"]) == list(design.stimulus_ids)
    assert offline["final"].shape == (design.n_trials, N_VOXELS) and np.isfinite(offline["online"]).all()
    r = [np.corrcoef(offline["final"][k], recorded["betas"][k])[0, 1] for k in range(design.n_trials)]
    assert np.median(r) > 0.8
    motion = np.loadtxt(out / "motion.tsv", skiprows=1)
    assert motion.shape == (N_VOLUMES, 10)
    # parameters are relative to the run's first volume
    truth = recorded["motion"][:, :3] - recorded["motion"][0, :3]
    assert np.sqrt(np.mean((motion[:, 2:5] - truth) ** 2)) < 0.05
    assert ZScore.load(out / "zscore.npz").n_voxels == N_VOXELS


def test_online_betas_are_zscored_over_the_session_so_far(offline):
    """The default running normalisation, checked against numpy over the online betas in arrival order."""
    online = offline["online"].astype(np.float64)
    for k in range(len(online)):
        so_far = online[: k + 1]
        expected = (online[k] - so_far.mean(axis=0)) / (so_far.std(axis=0) + 1e-6)
        np.testing.assert_allclose(offline["online_zscored"][k], expected, rtol=1e-4, atol=1e-3)
    expected_final = (offline["final"] - online.mean(axis=0)) / (online.std(axis=0) + 1e-6)
    np.testing.assert_allclose(offline["final_zscored"], expected_final, rtol=1e-4, atol=1e-3)


def test_live_chain_gives_the_offline_betas(recorded, offline, tmp_path):
    """Files land one by one in a watched folder; events are appended as their onsets pass."""
    design = recorded["design"]
    root = recorded["root"]
    watch = tmp_path / "scanner"
    watch.mkdir()
    events_path = tmp_path / "events.tsv"
    events_tsv = EventsTsv(events_path)
    corrector = MotionCorrector(
        Mask.from_nifti(root / "mask.nii.gz"), (nib.load(root / "reference.nii.gz").get_fdata(), recorded_affine(root))
    )
    session = SessionBetas(corrector, GlmConfig(noise_model="ar1"))
    ingestor = Ingestor(watch, ScannerConfig(), tmp_path / "quarantine").start()
    event_lines = (root / "events.tsv").read_text().splitlines()

    def scanner():
        events_path.write_text(event_lines[0] + "\n")
        for t, source in enumerate(sorted(recorded["raw"].iterdir())):
            for k in np.flatnonzero((design.onsets_s >= t * design.tr_s) & (design.onsets_s < (t + 1) * design.tr_s)):
                with open(events_path, "a") as handle:
                    handle.write(event_lines[k + 1] + "\n")
            shutil.copy(source, watch / (source.name + ".part"))
            (watch / (source.name + ".part")).rename(watch / source.name)
            time.sleep(0.01)
        time.sleep(0.3)
        ingestor.stop()

    writer = threading.Thread(target=scanner)
    writer.start()
    online = []
    while (item := ingestor.output.get(timeout=60)) is not END:
        events, errors = events_tsv.poll()
        assert errors == []
        online += session.add_events(1, events)
        if isinstance(item, Volume):
            online += session.add_volume(item)
    writer.join()
    final = session.end_run(1, N_VOLUMES)
    assert session.problems == []
    np.testing.assert_allclose(np.stack([b.beta for b in final]), offline["final"], rtol=1e-5, atol=1e-4)
    assert len(online) == design.n_trials
    for beta in online:
        assert beta.n_frames * design.tr_s >= beta.event.onset_s + GlmConfig().emit_delay_s


def recorded_affine(root):
    return nib.load(root / "reference.nii.gz").affine


def test_preprocess_without_a_mask_says_how_to_give_one(recorded, capsys):
    assert main(["preprocess", str(recorded["raw"]), "--out", str(recorded["root"] / "no-mask")]) == 2
    assert "no mask: give --mask FILE or set preprocess.mask" in capsys.readouterr().err


def test_a_run_of_one_volume_is_reported_and_nothing_is_lost(recorded, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(sorted(recorded["raw"].iterdir())[0], raw)
    root = recorded["root"]
    args = ["preprocess", str(raw), "--events", str(root / "events.tsv"), "--mask", str(root / "mask.nii.gz")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_volumes"] == 1 and summary["n_trials"] == 0
    assert any("betas need at least 2" in problem for problem in summary["problems"])
    assert (tmp_path / "out" / "motion.tsv").read_text().count("\n") == 2
