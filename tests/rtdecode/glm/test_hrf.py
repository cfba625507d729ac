import numpy as np
import pytest
from nilearn.glm.first_level.hemodynamic_models import compute_regressor
from nilearn.signal import create_cosine_drift

from rtdecode.glm import hrf


@pytest.mark.parametrize(("tr_s", "n_frames"), [(1.6, 188), (1.5, 288), (2.0, 37)])
def test_event_regressors_equal_nilearn(tr_s, n_frames):
    frames = hrf.frame_times_s(n_frames, tr_s)
    onsets = np.array([0.0, 3.3, 17.0, -5.0, n_frames * tr_s - 1.0])
    durations = np.array([3.0, 0.0, 1.7, 2.0, 3.0])
    mine = hrf.event_regressors(onsets, durations, frames, tr_s)
    for k in range(onsets.size):
        oracle, _ = compute_regressor(np.array([[onsets[k]], [durations[k]], [1.0]]), "glover", frames)
        np.testing.assert_allclose(mine[:, k], oracle[:, 0], rtol=0, atol=1e-12)


def test_regressors_for_a_longer_planned_run_agree_on_the_frames_so_far():
    onsets, durations = np.array([10.0, 50.0]), np.array([3.0, 3.0])
    short = hrf.event_regressors(onsets, durations, hrf.frame_times_s(100, 1.6), 1.6)
    long = hrf.event_regressors(onsets, durations, hrf.frame_times_s(250, 1.6), 1.6)
    np.testing.assert_allclose(long[:100], short, atol=1e-12)


@pytest.mark.parametrize(("tr_s", "n_frames", "high_pass_hz"), [(1.5, 288, 0.01), (1.6, 188, 0.01), (2.0, 250, 0.01)])
def test_cosine_drift_equals_nilearn(tr_s, n_frames, high_pass_hz):
    oracle = create_cosine_drift(high_pass_hz, hrf.frame_times_s(n_frames, tr_s))[:, :-1]  # without the constant
    np.testing.assert_allclose(hrf.cosine_drift(n_frames, tr_s, high_pass_hz), oracle, atol=1e-12)


def test_glover_hrf_sums_to_one_and_peaks_near_five_seconds():
    kernel = hrf.glover_hrf(1.5, oversampling=50)
    assert kernel.sum() == pytest.approx(1.0)
    assert 4.0 < np.argmax(kernel) * 1.5 / 50 < 6.0
