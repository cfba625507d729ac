"""The paper's retrieval protocol (spec §6): chance on random embeddings, ceiling on identical ones, a brute-force
oracle on the same draws, and clear errors."""

import numpy as np
import pytest
import torch

from rtdecode.errors import ConfigError
from rtdecode.evaluate.retrieval import normalised_rows, retrieval


def oracle(brain: np.ndarray, image: np.ndarray, n_way: int, n_draws: int, seed: int) -> tuple[list, list]:
    """Loops over every candidate, written independently of the code under test (same draws)."""
    rng = np.random.default_rng(seed)
    forward, backward = [], []
    for _ in range(n_draws):
        pick = np.sort(rng.choice(len(brain), size=n_way, replace=False))
        similarity = np.array([[float(np.dot(brain[i], image[j])) for j in pick] for i in pick])
        forward.append(float(np.mean(similarity.argmax(1) == np.arange(n_way))))
        backward.append(float(np.mean(similarity.argmax(0) == np.arange(n_way))))
    return forward, backward


def random_rows(n_items: int, seed: int, shape=(4, 8)) -> torch.Tensor:
    return normalised_rows(torch.randn(n_items, *shape, generator=torch.Generator().manual_seed(seed)))


def test_unrelated_embeddings_score_chance_one_in_300():
    result = retrieval(random_rows(1000, seed=1), random_rows(1000, seed=2))
    assert (result.n_way, result.n_draws, result.chance) == (300, 30, 1 / 300)
    # 30 draws x 300 trials: the mean of 9000 Bernoulli(1/300) has sd 0.0006; 5 sd either side
    assert abs(result.forward - 1 / 300) < 0.003 and abs(result.backward - 1 / 300) < 0.003


def test_identical_embeddings_score_the_ceiling():
    rows = random_rows(400, seed=3)
    result = retrieval(rows, rows)
    assert result.forward == result.backward == 1.0 and result.forward_ci95 == 0.0


def test_each_draw_matches_a_brute_force_oracle():
    image = random_rows(120, seed=4)
    brain = normalised_rows(image + 1.5 * random_rows(120, seed=5))
    result = retrieval(brain, image, n_way=50, n_draws=7, seed=11)
    forward, backward = oracle(brain.numpy(), image.numpy(), 50, 7, seed=11)
    assert result.forward_draws == pytest.approx(forward) and result.backward_draws == pytest.approx(backward)
    assert 0.05 < result.forward < 0.95 and result.forward_ci95 > 0


def test_mismatched_or_too_few_rows_are_refused():
    with pytest.raises(ConfigError, match=r"one shape, got \(5, 32\) and \(4, 32\)"):
        retrieval(random_rows(5, seed=0), random_rows(4, seed=0))
    with pytest.raises(ConfigError, match="at least 2 items"):
        retrieval(random_rows(1, seed=0), random_rows(1, seed=0))


def test_n_way_and_draws_are_checked():
    rows = random_rows(10, seed=0)
    with pytest.raises(ConfigError, match="n_way must be at least 2 and n_draws at least 1, got 1 and 30"):
        retrieval(rows, rows, n_way=1)
    with pytest.raises(ConfigError, match="got 300 and 0"):
        retrieval(rows, rows, n_draws=0)
