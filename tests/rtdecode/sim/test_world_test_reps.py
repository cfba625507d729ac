"""``WorldConfig.n_test_reps``: how often each shared test image is shown (calibration sessions show them once)."""

import numpy as np
import pytest

from rtdecode.errors import ConfigError
from rtdecode.sim.world import SyntheticWorld, WorldConfig

N_TEST, N_TRAIN = 10, 20


def _world(n_test_reps: int, trials_per_run: int = 12) -> SyntheticWorld:
    return SyntheticWorld(
        WorldConfig(
            subjects=("syn01", "syn02"),
            n_voxels=(30, 31),
            n_test_images=N_TEST,
            n_train_images=N_TRAIN,
            n_test_reps=n_test_reps,
            trials_per_run=trials_per_run,
        )
    )


def _runs_showing(plans, image: int) -> list[int]:
    """Per showing of ``image``, the index of the run it is in."""
    return [k for k, plan in enumerate(plans) for shown in plan.image_indices if shown == image]


@pytest.mark.parametrize("n_test_reps", [1, 2, 3])
@pytest.mark.parametrize("trials_per_run", [12, 62])
def test_each_test_image_is_shown_n_test_reps_times_in_different_runs(n_test_reps, trials_per_run):
    world = _world(n_test_reps, trials_per_run)
    for subject in ("syn01", "syn02"):
        plans = world.runs(subject)
        shown = np.concatenate([plan.image_indices for plan in plans])
        splits = [split for plan in plans for split in plan.splits]
        assert shown.size == N_TRAIN + N_TEST * n_test_reps
        assert splits.count("test") == N_TEST * n_test_reps
        for image in world.test_images:
            runs = _runs_showing(plans, image)
            assert len(runs) == n_test_reps and len(set(runs)) == n_test_reps, (subject, image, runs)
        train = world.train_images(subject)
        np.testing.assert_array_equal(np.sort(shown[np.isin(shown, train)]), np.sort(train))  # each once


def test_one_repetition_needs_no_extra_runs():
    """30 trials fit one run when each test image is shown once; 40 would too, but 2 repetitions need 2 runs."""
    assert len(_world(1, trials_per_run=62).runs("syn01")) == 1
    assert len(_world(2, trials_per_run=62).runs("syn01")) == 2


@pytest.mark.parametrize("n_test_reps", [0, -1])
def test_fewer_than_one_repetition_is_refused(n_test_reps):
    with pytest.raises(ConfigError, match=rf"WorldConfig.n_test_reps must be at least 1, got {n_test_reps}"):
        WorldConfig(n_test_reps=n_test_reps)
