"""Two-way identification and correlation distance: ceiling, chance, a hand-worked example, a double-loop oracle,
scipy's correlation distance, and clear errors."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import torch

from rtdecode.errors import ConfigError
from rtdecode.evaluate.identification import (
    correlation_distance,
    correlation_distances,
    two_way_identification,
    two_way_per_recon,
)


def double_loop_two_way(recon_features: np.ndarray, image_features: np.ndarray) -> np.ndarray:
    """Per-recon two-way identification written as plainly as possible: every recon against every other image."""
    n_items = len(recon_features)
    recons = recon_features.reshape(n_items, -1)
    images = image_features.reshape(n_items, -1)
    scores = []
    for j in range(n_items):
        own = np.corrcoef(images[j], recons[j])[0, 1]
        n_lower = sum(np.corrcoef(images[i], recons[j])[0, 1] < own for i in range(n_items) if i != j)
        scores.append(n_lower / (n_items - 1))
    return np.array(scores)


def random_features(n_items: int, seed: int, shape=(4, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_items, *shape))


def test_identical_features_reach_the_ceiling():
    features = random_features(50, seed=0)
    assert two_way_identification(features, features) == 1.0
    assert correlation_distance(features, features) == pytest.approx(0.0, abs=1e-12)


def test_unrelated_features_score_chance():
    # N = 300: each recon's score is close to uniform on [0, 1] (sd 0.29), so the mean over 300 recons has an sd of
    # about 0.017; 0.07 is 4 sd. Correlation of two independent 64-vectors has sd 1/8, so the mean distance over 300
    # pairs has an sd of about 0.007; 0.03 is 4 sd.
    images = random_features(300, seed=1)
    unrelated = random_features(300, seed=2)
    assert two_way_identification(unrelated, images) == pytest.approx(0.5, abs=0.07)
    assert correlation_distance(unrelated, images) == pytest.approx(1.0, abs=0.03)
    order = np.random.default_rng(3).permutation(300)
    shuffled = images[order[np.roll(np.arange(300), 1)]][np.argsort(order)]  # image k's features moved to another k
    assert not np.any(np.all(shuffled == images, axis=(1, 2)))
    assert two_way_identification(shuffled, images) == pytest.approx(0.5, abs=0.07)


def test_hand_worked_three_by_three():
    # Centred 3-vectors u, v, w: corr(u, v) = 1/2, corr(u, w) = -1/2, corr(v, w) = 1/2; p = (-1, 2, -1) has
    # corr(u, p) = -sqrt(3)/2, corr(v, p) = 0, corr(w, p) = sqrt(3)/2. Offsets and scales must not matter.
    u, v, w, p = np.array([1.0, -1, 0]), np.array([1.0, 0, -1]), np.array([0.0, 1, -1]), np.array([-1.0, 2, -1])
    images = np.stack([u, 3 * v + 7, w])
    recons = np.stack([-u, u, 0.5 * p - 2])
    # r[image i, recon j]:  j=0: [-1, -1/2, 1/2] own -1 -> 0 of 2 lower;  j=1: [1, 1/2, -1/2] own 1/2 -> 1 of 2;
    #                       j=2: [-sqrt(3)/2, 0, sqrt(3)/2] own sqrt(3)/2 -> 2 of 2.
    np.testing.assert_allclose(two_way_per_recon(recons, images), [0.0, 0.5, 1.0], rtol=0, atol=0)
    assert two_way_identification(recons, images) == pytest.approx(0.5, abs=1e-15)
    np.testing.assert_allclose(correlation_distances(recons, images), [2.0, 0.5, 1 - math.sqrt(3) / 2], atol=1e-12)


def test_equals_a_double_loop_reference_on_random_data():
    generator = np.random.default_rng(4)
    images = random_features(25, seed=5, shape=(3, 5, 2))
    recons = images + 1.5 * generator.standard_normal(images.shape)  # related, so scores spread over [0, 1]
    per_recon = two_way_per_recon(recons, images)
    np.testing.assert_array_equal(per_recon, double_loop_two_way(recons, images))
    assert 0.0 < per_recon.min() < per_recon.max() <= 1.0
    assert two_way_identification(recons, images) == pytest.approx(per_recon.mean(), abs=1e-15)


def test_correlation_distance_equals_scipy_mean():
    images = random_features(40, seed=6, shape=(7, 3))
    recons = images + random_features(40, seed=7, shape=(7, 3))
    expected = [
        scipy.spatial.distance.correlation(r.reshape(-1), i.reshape(-1)) for r, i in zip(recons, images, strict=True)
    ]
    np.testing.assert_allclose(correlation_distances(recons, images), expected, rtol=0, atol=1e-12)
    assert correlation_distance(recons, images) == pytest.approx(np.mean(expected), abs=1e-12)


def test_torch_tensors_give_the_numpy_result():
    images = random_features(20, seed=8)
    recons = images + random_features(20, seed=9)
    as_float32 = torch.from_numpy(recons).float(), torch.from_numpy(images).float()
    assert two_way_identification(*as_float32) == two_way_identification(*(t.double().numpy() for t in as_float32))
    assert correlation_distance(*as_float32) == pytest.approx(correlation_distance(recons, images), abs=1e-6)


def test_constant_features_have_no_correlation():
    images = random_features(5, seed=10)
    recons = images.copy()
    recons[2] = 3.0
    with np.errstate(invalid="ignore", divide="ignore"):
        assert np.isnan(scipy.spatial.distance.correlation(recons[2].reshape(-1), images[2].reshape(-1)))
        np.testing.assert_array_equal(two_way_per_recon(recons, images), double_loop_two_way(recons, images))
    assert two_way_per_recon(recons, images)[2] == 0.0  # a NaN is never lower
    assert np.isnan(correlation_distance(recons, images))


@pytest.mark.parametrize(
    ("recons", "images", "message"),
    [
        (np.zeros((3, 4)), np.zeros((4, 4)), "same number of items, got 3 and 4"),
        (np.zeros((3, 4)), np.zeros((3, 5)), "same number .* of features in both sets, got 4 and 5"),
        (np.zeros((3, 1)), np.zeros((3, 1)), r"\(>= 2\) of features"),
        (np.zeros(3), np.zeros(3), r"shape \(N, ...\)"),
    ],
)
def test_mismatched_features_are_named(recons, images, message):
    for metric in (two_way_identification, correlation_distance):
        with pytest.raises(ConfigError, match=message):
            metric(recons, images)


def test_two_way_needs_two_items_and_distance_one():
    features = random_features(1, seed=11)
    with pytest.raises(ValueError, match="two-way identification needs N >= 2 items, got N = 1"):
        two_way_identification(features, features)
    assert correlation_distance(features, features) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="correlation distance needs N >= 1 items, got N = 0"):
        correlation_distance(features[:0], features[:0])
