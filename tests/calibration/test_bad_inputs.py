"""Bad calibration inputs stop with a clear error naming the file or setting, before any run is motion-corrected
(no per-run betas exist afterwards)."""

import shutil

import pytest

from calibration.calibrate import calibrate
from rtdecode.config import Config
from rtdecode.errors import CalibrationError
from tests.calibration.session_fixture import SUBJECT, config_values, write_session


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Runs 1 and 2 of the simulated session (120 trials, 60 of them held-out test trials)."""
    return write_session(tmp_path_factory.mktemp("bad-inputs") / "session", runs=[1, 2])


def _calibrate(tmp_path, session, preprocess=None, **changes):
    values = config_values(tmp_path / "home", session, **changes)
    values["calibrate"]["events"] = [str(p) for p in changes.get("events", session.events)]
    if preprocess:
        values["preprocess"].update(preprocess)
    work = tmp_path / "work"
    with pytest.raises(CalibrationError) as caught:
        calibrate(Config.model_validate(values), SUBJECT, 1, work_dir=work, progress=False)
    assert not (work / "runs").exists(), "the error came after the betas were being computed"
    return str(caught.value)


def _edited_events(tmp_path, path, edit) -> str:
    lines = path.read_text().splitlines()
    target = tmp_path / path.name
    target.write_text("\n".join(edit(lines)) + "\n")
    return str(target)


def test_a_missing_events_file(tmp_path, session):
    message = _calibrate(tmp_path, session, events=[session.events[0], tmp_path / "run-02_events.tsv"])
    assert "events file of run 2 not found" in message and "run-02_events.tsv" in message


def test_fewer_events_files_than_runs(tmp_path, session):
    region = {"mask": str(session.region_mask_path)}  # run 1 alone has no repeated images to choose voxels from
    message = _calibrate(tmp_path, session, region, events=[session.events[0]], min_train_trials=5)
    assert "2 run(s)" in message and "1 events file(s)" in message


def test_a_trial_after_its_run_ended(tmp_path, session):
    late = _edited_events(tmp_path, session.events[1], lambda lines: [*lines, "1000.0\t3.0\tlate-1\timg-00000\ttest"])
    message = _calibrate(tmp_path, session, events=[session.events[0], late])
    assert "late-1" in message and "after run 2 ended" in message


def test_a_trial_id_used_twice(tmp_path, session):
    def duplicate(lines):
        first = lines[1].split("\t")
        return [*lines, "\t".join(["700.0", first[1], first[2], first[3], first[4]])]

    message = _calibrate(tmp_path, session, events=[_edited_events(tmp_path, session.events[0], duplicate)])
    assert "trial-" in message and "more than once" in message


def test_an_unreadable_onset(tmp_path, session):
    bad = _edited_events(
        tmp_path, session.events[0], lambda lines: [lines[0], "soon" + lines[1][lines[1].index("\t") :]]
    )
    message = _calibrate(tmp_path, session, events=[bad, session.events[1]])
    assert "onset must be a number" in message and "run 1" in message


def test_a_missing_stimulus_image(tmp_path, session):
    images = tmp_path / "stimuli"
    shutil.copytree(session.images_dir, images)
    missing = sorted(images.glob("*.png"))[3]
    missing.unlink()
    message = _calibrate(tmp_path, session, images_dir=str(images))
    assert missing.stem in message and "missing" in message


def test_too_few_train_trials(tmp_path, session):
    message = _calibrate(tmp_path, session, min_train_trials=500)
    assert "train trials" in message and "min_train_trials = 500" in message


def test_runs_on_different_grids(tmp_path, session):
    other = write_session(tmp_path / "other", runs=[2], shape=(30, 34, 26))
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in session.raw_dir.glob("001_000001_*.dcm"):
        shutil.copy(path, raw / path.name)
    for path in other.raw_dir.glob("001_000002_*.dcm"):
        shutil.copy(path, raw / path.name)
    message = _calibrate(tmp_path, session, raw_dir=str(raw))
    assert "run 2" in message and "(30, 34, 26)" in message and "one acquisition grid" in message


def test_no_pretrained_model_to_fine_tune(tmp_path, session):
    message = _calibrate(tmp_path, session, from_scratch=False)
    assert "calibrate.pretrained" in message and "--from-scratch" in message


def test_no_image_embedder(tmp_path, session):
    message = _calibrate(tmp_path, session, embedder_random=None)
    assert "models.image_embedder" in message


def test_too_few_repeated_images_to_choose_voxels(tmp_path, session):
    message = _calibrate(tmp_path, session, events=[session.events[0]], min_train_trials=5)
    assert "0 image(s) shown more than once" in message and "--mask" in message
