"""Per-epoch retrieval (spec §6): top-1 both ways over random n-way draws, checked against a brute-force oracle."""

import numpy as np
import pytest
import torch

from rtdecode.evaluate.retrieval import normalised_rows
from trainer.validation import retrieval


def oracle(brain: np.ndarray, image: np.ndarray, n_way: int, n_draws: int, seed: int) -> tuple[float, float]:
    """Loops over every candidate, written independently of the code under test (same draws)."""
    rng = np.random.default_rng(seed)
    forward, backward = [], []
    for _ in range(n_draws):
        pick = np.sort(rng.choice(len(brain), size=n_way, replace=False))
        hits_f = hits_b = 0
        for i in range(n_way):
            scores = [float(np.dot(brain[pick[i]], image[pick[j]])) for j in range(n_way)]
            hits_f += int(np.argmax(scores) == i)
            scores = [float(np.dot(brain[pick[j]], image[pick[i]])) for j in range(n_way)]
            hits_b += int(np.argmax(scores) == i)
        forward.append(hits_f / n_way)
        backward.append(hits_b / n_way)
    return float(np.mean(forward)), float(np.mean(backward))


def embeddings(n_items: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n_items, 5, 7, generator=generator)
    brain = image + noise * torch.randn(n_items, 5, 7, generator=generator)
    brain[3] = image[4]  # forward: brain 3 finds image 4; backward: images 3 and 4 both find brain 3
    return normalised_rows(brain), normalised_rows(image)


def test_retrieval_matches_the_brute_force_oracle_over_30_draws():
    brain, image = embeddings(80, noise=1.2)
    result = retrieval(brain, image, "s1", n_way=50, n_draws=30, seed=7)
    forward, backward = oracle(brain.numpy(), image.numpy(), 50, 30, seed=7)
    assert (result.n_way, result.n_draws) == (50, 30)
    assert result.forward == pytest.approx(forward, abs=1e-6)  # float32 means
    assert result.backward == pytest.approx(backward, abs=1e-6)
    assert 0.02 < result.forward < 0.98 and result.forward != result.backward  # neither trivial nor symmetric
    assert 0 < result.forward_ci95 < 0.1 and 0 < result.backward_ci95 < 0.1


def test_fewer_items_than_n_way_score_all_of_them_once():
    brain, image = embeddings(12, noise=0.01)
    result = retrieval(brain, image, "s1", n_way=300, n_draws=30)
    assert (result.n_way, result.n_draws, result.chance) == (12, 1, 1 / 12)
    assert result.forward == pytest.approx(11 / 12) and result.backward == pytest.approx(10 / 12)
    assert result.forward_ci95 == 0.0


def test_shuffled_pairs_score_near_chance():
    brain, image = embeddings(300, noise=0.0)
    shuffled = brain[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    result = retrieval(shuffled, image, "s1", n_way=300, n_draws=1)
    assert result.forward <= 0.03 and result.backward <= 0.03
