"""Bad input to the online GLM: clear errors, and the run goes on with the next good input."""

import numpy as np
import pytest

from rtdecode.errors import EventError, GlmError
from rtdecode.glm.online import GlmSettings, OnlineGLM
from rtdecode.records import TrialEvent


def _glm(**settings) -> OnlineGLM:
    return OnlineGLM(GlmSettings(tr_s=2.0, **settings), n_voxels=5)


def test_non_finite_voxels_are_refused_and_the_run_goes_on(rng):
    glm = _glm()
    glm.add_event(TrialEvent("a", 2.0, 2.0))
    glm.add_volume(0, rng.normal(size=5), np.zeros(6))
    bad = rng.normal(size=5)
    bad[[1, 3]] = [np.nan, np.inf]
    with pytest.raises(GlmError, match="frame 1: 2 non-finite"):
        glm.add_volume(1, bad, np.zeros(6))
    assert glm.n_kept == 1
    glm.add_volume(1, rng.normal(size=5), np.zeros(6))  # the same frame, now good
    assert glm.n_kept == 2


@pytest.mark.parametrize(
    ("frame", "vector", "motion", "message"),
    [
        (0, np.zeros(4), np.zeros(6), r"shape \(4,\), expected \(5,\)"),
        (-1, np.zeros(5), np.zeros(6), "negative or already added"),
        (0, np.zeros(5), None, "motion_params must be 6 finite numbers"),
        (0, np.zeros(5), np.full(6, np.nan), "motion_params must be 6 finite numbers"),
    ],
)
def test_bad_volumes_name_the_problem(frame, vector, motion, message):
    with pytest.raises(GlmError, match=message):
        _glm().add_volume(frame, vector, motion)


def test_a_frame_added_twice_is_refused(rng):
    glm = _glm()
    glm.add_volume(3, rng.normal(size=5), np.zeros(6))
    with pytest.raises(GlmError, match="frame 3: frame index is negative or already added"):
        glm.add_volume(3, rng.normal(size=5), np.zeros(6))


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (TrialEvent("x", -30.0, 1.0), "before the run"),
        (TrialEvent("x", float("nan"), 1.0), "before the run"),
        (TrialEvent("x", 5.0, -1.0), "duration -1.0 s"),
    ],
)
def test_bad_events_are_refused(event, message):
    with pytest.raises(EventError, match=message):
        _glm().add_event(event)


def test_a_trial_id_used_twice_is_refused():
    glm = _glm()
    glm.add_event(TrialEvent("x", 4.0, 1.0))
    with pytest.raises(EventError, match="trial id used twice"):
        glm.add_event(TrialEvent("x", 9.0, 1.0))


def test_trials_after_the_end_are_reported_not_estimated(rng):
    glm = _glm(motion_regressors=False)
    glm.add_event(TrialEvent("in", 4.0, 2.0))
    glm.add_event(TrialEvent("after", 100.0, 2.0))
    for frame in range(20):
        glm.add_volume(frame, rng.normal(size=5))
    final = glm.finish()
    assert [b.event.trial_id for b in final] == ["in"]
    assert [e.trial_id for e in glm.unestimable()] == ["after"]
    with pytest.raises(GlmError, match="finished"):
        glm.add_volume(20, rng.normal(size=5))


def test_estimating_an_unknown_trial_or_from_one_volume_is_an_error(rng):
    glm = _glm(motion_regressors=False)
    glm.add_event(TrialEvent("a", 0.0, 2.0))
    with pytest.raises(GlmError, match="no trial 'b'"):
        glm.estimate("b")
    glm.add_volume(0, rng.normal(size=5))
    with pytest.raises(GlmError, match="1 volume"):
        glm.estimate("a")


@pytest.mark.parametrize(("name", "value"), [("tr_s", 0.0), ("mode", "lsx"), ("noise_model", "ar2"), ("ar1_bins", 0)])
def test_bad_settings_name_the_setting(name, value):
    with pytest.raises(GlmError, match=name):
        GlmSettings(**{"tr_s": 1.5, name: value})
