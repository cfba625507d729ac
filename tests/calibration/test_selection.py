"""Voxel selection: repeat reliability recovers planted reliable voxels, the null threshold holds its p-value, the
brain mask recovers a synthetic head, and bad sessions fail with CalibrationError naming the fix."""

import json

import numpy as np
import pytest
import scipy.stats

from calibration.selection import (
    Reliability,
    brain_mask,
    fdr_threshold,
    reliability_threshold,
    repeat_reliability,
    select_voxels,
)
from rtdecode.errors import CalibrationError


def session_betas(
    n_images: int, n_reps: int, n_voxels: int, reliable: np.ndarray, signal_sd: float, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Betas of ``n_images`` images each shown ``n_reps`` times in shuffled order, plus 7 images shown once.

    Reliable voxels carry a fixed per-image effect (sd ``signal_sd``) plus unit noise; the others are pure noise.
    """
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(n_images) for _ in range(n_reps)] + [f"once{i}" for i in range(7)]
    ids = [ids[i] for i in rng.permutation(len(ids))]
    effect = {name: rng.normal(0.0, signal_sd, n_voxels) for name in set(ids)}
    betas = rng.normal(size=(len(ids), n_voxels))
    for row, name in enumerate(ids):
        betas[row, reliable] += effect[name][reliable]
    return betas, ids


def test_reliability_selection_recovers_the_planted_voxels():
    n_voxels = 600
    reliable = np.random.default_rng(1).choice(n_voxels, size=80, replace=False)
    betas, ids = session_betas(n_images=60, n_reps=3, n_voxels=n_voxels, reliable=reliable, signal_sd=1.0, seed=2)
    reliability = repeat_reliability(betas, ids)
    assert (reliability.n_images, reliability.n_pairs) == (60, 3)
    # signal variance 1, noise variance 1: the expected correlation of two showings is 0.5
    assert abs(np.median(reliability.values[reliable]) - 0.5) < 0.1
    selection = select_voxels(reliability)
    chosen = set(selection.indices.tolist())
    truth = set(reliable.tolist())
    recall = len(chosen & truth) / len(truth)
    precision = len(chosen & truth) / len(chosen)
    assert recall > 0.9 and precision > 0.9, (recall, precision)
    assert selection.threshold == pytest.approx(fdr_threshold(reliability, 0.05))
    assert np.all(np.diff(selection.indices) > 0) and selection.indices.dtype == np.int64


def test_max_voxels_keeps_the_most_reliable():
    values = np.linspace(-0.2, 0.9, 50)
    reliability = Reliability(values=values, n_images=40, n_pairs=1)
    selection = select_voxels(reliability, threshold=0.1, max_voxels=12, min_voxels=5)
    assert selection.indices.tolist() == list(range(38, 50))
    assert selection.n_candidates == 50


def test_reliability_matches_pearson_for_one_pair_and_ignores_single_showings():
    rng = np.random.default_rng(3)
    betas = rng.normal(size=(11, 4))
    ids = ["a", "b", "c", "d", "x", "a", "b", "c", "d", "y", "z"]
    betas[:, 3] = 2.5  # zero variance: reliability 0, not NaN
    betas[0, 2] = np.nan  # a non-finite beta: reliability 0, not NaN
    reliability = repeat_reliability(betas, ids)
    first, second = betas[[0, 1, 2, 3]], betas[[5, 6, 7, 8]]
    for voxel in range(2):
        assert reliability.values[voxel] == pytest.approx(scipy.stats.pearsonr(first[:, voxel], second[:, voxel])[0])
    assert reliability.values[2:].tolist() == [0.0, 0.0]
    assert (reliability.n_images, reliability.n_pairs) == (4, 1)


def test_pairs_are_weighted_by_the_images_that_have_both_repeats():
    rng = np.random.default_rng(4)
    # 5 images shown twice, 4 of them a third time: pairs (0,1) use 5 images, (0,2) and (1,2) use 4
    ids = ["a", "b", "c", "d", "e", "a", "b", "c", "d", "e", "a", "b", "c", "d"]
    betas = rng.normal(size=(len(ids), 6))
    reliability = repeat_reliability(betas, ids)
    rows = {name: [i for i, n in enumerate(ids) if n == name] for name in "abcde"}

    def pair_r(rep_a: int, rep_b: int, names: str) -> np.ndarray:
        x = betas[[rows[n][rep_a] for n in names]]
        y = betas[[rows[n][rep_b] for n in names]]
        return np.array([scipy.stats.pearsonr(x[:, v], y[:, v])[0] for v in range(6)])

    expected = (5 * pair_r(0, 1, "abcde") + 4 * pair_r(0, 2, "abcd") + 4 * pair_r(1, 2, "abcd")) / 13
    np.testing.assert_allclose(reliability.values, expected, atol=1e-12)
    assert reliability.n_pairs == 3


def test_null_data_passes_the_threshold_at_about_p():
    p_value = 0.01
    betas, ids = session_betas(
        n_images=50, n_reps=2, n_voxels=20000, reliable=np.array([], dtype=int), signal_sd=0.0, seed=5
    )
    reliability = repeat_reliability(betas, ids)
    fraction = float(np.mean(reliability.values > reliability_threshold(reliability.n_images, p_value)))
    assert 0.3 * p_value <= fraction <= 3 * p_value, fraction


def test_threshold_follows_the_fisher_z_null():
    assert reliability_threshold(103, 0.05) == pytest.approx(np.tanh(1.6448536 / 10.0), rel=1e-6)
    assert reliability_threshold(50, 0.001) > reliability_threshold(50, 0.01) > reliability_threshold(500, 0.01)
    with pytest.raises(CalibrationError, match="n_images > 3"):
        reliability_threshold(3)
    with pytest.raises(CalibrationError, match="p_value"):
        reliability_threshold(40, 1.5)


def test_summary_is_json_ready_for_the_report():
    betas, ids = session_betas(n_images=30, n_reps=2, n_voxels=200, reliable=np.arange(40), signal_sd=1.5, seed=6)
    summary = select_voxels(repeat_reliability(betas, ids), max_voxels=30).summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["n_candidates"] == 200 and summary["n_selected"] == 30 and summary["n_repeated_images"] == 30
    histogram = summary["histogram"]
    assert sum(histogram["counts"]) == 200
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    assert (histogram["edges"][0], histogram["edges"][-1]) == (-1.0, 1.0)
    quantiles = summary["quantiles"]
    assert quantiles["min"] <= quantiles["median"] <= quantiles["max"]


def test_too_few_repeated_images_is_an_error_naming_the_count():
    ids = ["a", "b", "a", "b", "c", "d"]
    with pytest.raises(CalibrationError, match=r"2 images were shown at least twice.*--mask"):
        repeat_reliability(np.zeros((6, 5)), ids)


def test_too_few_selected_voxels_is_an_error_with_the_fixes():
    betas, ids = session_betas(n_images=40, n_reps=2, n_voxels=300, reliable=np.arange(3), signal_sd=2.0, seed=7)
    with pytest.raises(CalibrationError, match=r"need at least 10.*calibrate.reliability_threshold.*--mask"):
        select_voxels(repeat_reliability(betas, ids), threshold=0.6)


def test_mismatched_ids_and_bad_counts_are_errors():
    with pytest.raises(CalibrationError, match="stimulus_ids has 3 entries but betas has 4 rows"):
        repeat_reliability(np.zeros((4, 2)), ["a", "a", "b"])
    reliability = Reliability(values=np.zeros(20), n_images=10, n_pairs=1)
    with pytest.raises(CalibrationError, match="max_voxels"):
        select_voxels(reliability, max_voxels=5, min_voxels=10)


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    distance = sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3))
    return distance <= 1.0


def test_brain_mask_recovers_an_ellipsoid_head():
    rng = np.random.default_rng(8)
    shape = (41, 46, 37)
    head = ellipsoid(shape, (20.0, 23.0, 18.0), (15.0, 18.0, 13.0))
    volume = np.abs(rng.normal(0.0, 40.0, shape))  # Rician-like background noise
    volume[head] = rng.normal(1000.0, 60.0, int(head.sum()))
    volume[ellipsoid(shape, (20.0, 23.0, 18.0), (3.0, 4.0, 3.0))] = 100.0  # dark structure inside: filled
    volume[2:4, 2:4, 2:4] = 1200.0  # bright speck outside the head: dropped
    mask = brain_mask(volume)
    dice = 2 * np.sum(mask & head) / (mask.sum() + head.sum())
    assert mask.dtype == bool and mask.shape == shape
    assert dice > 0.95, dice
    assert not mask[2:4, 2:4, 2:4].any()
    assert mask[20, 23, 18]


def test_brain_mask_rejects_bad_references():
    with pytest.raises(CalibrationError, match=r"3D volume; got shape \(4, 5, 6, 2\)"):
        brain_mask(np.ones((4, 5, 6, 2)))
    volume = np.ones((4, 5, 6))
    volume[1, 1, 1] = np.nan
    with pytest.raises(CalibrationError, match="non-finite"):
        brain_mask(volume)
    with pytest.raises(CalibrationError, match="looks empty"):
        brain_mask(np.zeros((4, 5, 6)))


def test_the_fdr_threshold_keeps_noise_voxels_out():
    """Pure noise over 20000 voxels: a per-voxel p = 0.01 threshold would keep about 200; the FDR one keeps almost
    none. With planted signal, at most about 5% of the kept voxels are noise."""
    null, ids = session_betas(
        n_images=50, n_reps=2, n_voxels=20000, reliable=np.array([], dtype=int), signal_sd=0.0, seed=3
    )
    reliability = repeat_reliability(null, ids)
    assert np.sum(reliability.values > reliability_threshold(reliability.n_images, 0.01)) > 100
    assert np.sum(reliability.values > fdr_threshold(reliability, 0.05)) <= 5
    reliable = np.arange(0, 20000, 50)  # 400 signal voxels among 20000
    betas, ids = session_betas(n_images=80, n_reps=3, n_voxels=20000, reliable=reliable, signal_sd=1.0, seed=4)
    kept = select_voxels(repeat_reliability(betas, ids), fdr=0.05).indices
    false = np.setdiff1d(kept, reliable).size
    assert kept.size >= 300 and false / kept.size < 0.1, (kept.size, false)
    with pytest.raises(CalibrationError, match="fdr must be in"):
        fdr_threshold(reliability, 1.5)
