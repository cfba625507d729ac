import numpy as np
import pytest

from rtdecode.errors import GlmError
from rtdecode.glm.normalise import ZScore
from rtdecode.records import TrialBeta, TrialEvent


def test_running_statistics_equal_numpy_over_the_betas_so_far(rng):
    betas = rng.normal(3.0, 2.0, (30, 50))
    zscore = ZScore.running(50)
    for k, beta in enumerate(betas):
        zscore.observe(beta)
        so_far = betas[: k + 1]
        expected = (beta - so_far.mean(axis=0)) / (so_far.std(axis=0) + 1e-6)
        np.testing.assert_allclose(zscore.apply(beta), expected, rtol=1e-5, atol=1e-5)


def test_calibration_statistics_equal_a_standard_scaler(rng):
    betas = rng.normal(3.0, 2.0, (40, 20))
    betas[:, 4] = 7.0  # no spread: divided by 1, as StandardScaler does
    zscore = ZScore.from_betas(betas)
    std = betas.std(axis=0)
    expected = (betas[0] - betas.mean(axis=0)) / np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(zscore.apply(betas[0]), expected, rtol=1e-5, atol=1e-6)
    zscore.observe(betas[1] * 100)  # fixed statistics never move
    np.testing.assert_allclose(zscore.apply(betas[0]), expected, rtol=1e-5, atol=1e-6)


def test_saved_statistics_continue_where_they_stopped(tmp_path, rng):
    betas = rng.normal(size=(10, 8))
    whole = ZScore.running(8, warmup=3)
    first_half = ZScore.running(8, warmup=3)
    for beta in betas[:5]:
        whole.observe(beta)
        first_half.observe(beta)
    first_half.save(tmp_path / "zscore.npz")
    resumed = ZScore.load(tmp_path / "zscore.npz")
    for beta in betas[5:]:
        whole.observe(beta)
        resumed.observe(beta)
    np.testing.assert_allclose(resumed.apply(betas[0]), whole.apply(betas[0]))
    assert resumed.ready and resumed.warmup == 3 and resumed.count == 10


def test_normalise_stamps_the_trial_and_warmup_gates_ready(rng):
    zscore = ZScore.running(4, warmup=2)
    trial = TrialBeta(TrialEvent("a", 1.0, 3.0), 1, rng.normal(size=4).astype(np.float32), "online", 10)
    first = zscore.normalise(trial)
    assert not zscore.ready and "normalised" in first.timestamps
    zscore.normalise(trial)
    assert zscore.ready and first.zscored.dtype == np.float32


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(GlmError, match="no betas observed yet"):
        ZScore.running(3).apply(np.zeros(3))
    with pytest.raises(GlmError, match=r"beta has shape \(4,\); the normalisation statistics are for \(3,\)"):
        ZScore.from_betas(np.ones((3, 3))).apply(np.zeros(4))
    with pytest.raises(GlmError, match="cannot read normalisation statistics from .*missing.npz"):
        ZScore.load(tmp_path / "missing.npz")
    with pytest.raises(GlmError, match="method must be one of"):
        ZScore("median", 0, np.zeros(2), np.zeros(2))
