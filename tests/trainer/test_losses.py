"""MindEye2's losses (spec §3.3) against independent computations: explicit row loops in numpy/math, and
``torch.nn.functional.cross_entropy`` with probability targets."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from rtdecode.evaluate.retrieval import normalised_rows
from trainer.losses import (
    MIXCO_BETA,
    MIXCO_SELECT_PROB,
    MIXCO_TEMPERATURE,
    SOFTCLIP_TEMPERATURES,
    VALIDATION_TEMPERATURE,
    Mixing,
    bimixco_loss,
    low_level_l1,
    mixco_targets,
    soft_clip_loss,
    softclip_temperatures,
)


def _unit_rows(rng: np.random.Generator, n_rows: int, dim: int) -> torch.Tensor:
    rows = rng.standard_normal((n_rows, dim))
    return torch.as_tensor(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=torch.float32)


def _log_softmax_row(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b, strict=True)))


def _reference_bimixco(brain, image, perm, lam, tau: float) -> float:
    """Row by row: target lam_i at i and 1 - lam_i at perm_i; both directions of the soft cross-entropy."""
    brain, image = brain.double().numpy(), image.double().numpy()
    n = brain.shape[0]
    target = [[0.0] * n for _ in range(n)]
    for i in range(n):
        target[i][i] += float(lam[i])
        target[i][int(perm[i])] += 1.0 - float(lam[i])
    forward = 0.0
    backward = 0.0
    for i in range(n):
        log_p = _log_softmax_row([_dot(brain[i], image[j]) / tau for j in range(n)])
        forward -= sum(target[i][j] * log_p[j] for j in range(n))
        log_q = _log_softmax_row([_dot(image[i], brain[j]) / tau for j in range(n)])
        backward -= sum(target[j][i] * log_q[j] for j in range(n))
    return (forward / n + backward / n) / 2


def _reference_soft_clip(brain, image, tau: float) -> float:
    brain, image = brain.double().numpy(), image.double().numpy()
    n = brain.shape[0]
    soft = [
        [math.exp(v) for v in _log_softmax_row([_dot(image[i], image[j]) / tau for j in range(n)])] for i in range(n)
    ]
    forward = backward = 0.0
    for i in range(n):
        log_p = _log_softmax_row([_dot(brain[i], image[j]) / tau for j in range(n)])
        forward -= sum(soft[i][j] * log_p[j] for j in range(n))
        log_q = _log_softmax_row([_dot(image[i], brain[j]) / tau for j in range(n)])
        backward -= sum(soft[i][j] * log_q[j] for j in range(n))
    return (forward / n + backward / n) / 2


def test_paper_constants():
    assert MIXCO_BETA == 0.15
    assert MIXCO_SELECT_PROB == 0.5
    assert MIXCO_TEMPERATURE == 0.006
    assert SOFTCLIP_TEMPERATURES == (0.004, 0.0075)
    assert VALIDATION_TEMPERATURE == 0.006


# ------------------------------------------------------------------------------------------------ mixing


def test_mixing_draw_statistics_match_beta_015_with_half_mixed():
    n = 20000
    mixing = Mixing.draw(n, np.random.default_rng(7))
    perm, lam, mixed = mixing.perm.numpy(), mixing.lam.numpy(), mixing.mixed.numpy()
    assert mixing.lam.dtype == torch.float32 and mixing.perm.dtype == torch.long and mixing.mixed.dtype == torch.bool
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    assert abs(mixed.mean() - 0.5) < 0.02
    assert np.all(lam[~mixed] == 1.0)  # unmixed samples: lam exactly 1
    mixed_lam = lam[mixed].astype(np.float64)
    assert np.all((mixed_lam >= 0) & (mixed_lam <= 1))
    # Beta(0.15, 0.15): mean 1/2, variance ab / ((a+b)^2 (a+b+1)) = 0.1923; U-shaped
    assert abs(mixed_lam.mean() - 0.5) < 0.02
    assert abs(mixed_lam.var() - 0.0225 / (0.09 * 1.3)) < 0.01
    # the empirical CDF follows Beta(0.15, 0.15) (below 0.99: float32 rounds ~3.6% of the draws up to exactly 1)
    grid = np.linspace(0.001, 0.99, 200)
    empirical = (mixed_lam[None, :] <= grid[:, None]).mean(axis=1)
    assert np.max(np.abs(empirical - scipy.stats.beta(0.15, 0.15).cdf(grid))) < 0.015
    assert np.max(np.abs(empirical - grid)) > 0.2  # far from uniform


def test_mixing_draw_is_deterministic_per_generator_seed():
    a, b = Mixing.draw(32, np.random.default_rng(3)), Mixing.draw(32, np.random.default_rng(3))
    other = Mixing.draw(32, np.random.default_rng(4))
    for field in ("perm", "lam", "mixed"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.perm, other.perm)
    assert not torch.equal(a.lam, other.lam)


def test_mixing_apply_is_lam_x_plus_one_minus_lam_partner():
    rng = np.random.default_rng(0)
    voxels = torch.as_tensor(rng.standard_normal((9, 5)), dtype=torch.float32)
    mixing = Mixing.draw(9, np.random.default_rng(11))
    assert mixing.mixed.any() and (~mixing.mixed).any()
    out = mixing.apply(voxels)
    for i in range(9):
        lam, partner = float(mixing.lam[i]), int(mixing.perm[i])
        expected = [lam * float(voxels[i, j]) + (1 - lam) * float(voxels[partner, j]) for j in range(5)]
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-6)
        if not mixing.mixed[i]:
            assert torch.equal(out[i], voxels[i])
    three_d = torch.as_tensor(rng.standard_normal((9, 2, 3)), dtype=torch.float32)
    np.testing.assert_allclose(
        mixing.apply(three_d).reshape(9, -1).numpy(), mixing.apply(three_d.reshape(9, -1)).numpy(), rtol=1e-6
    )


def test_mixco_targets_rows_sum_to_one_including_a_self_partner():
    perm = torch.tensor([2, 1, 0, 4, 3])  # sample 1 is its own partner
    lam = torch.tensor([0.3, 0.2, 1.0, 0.9, 0.05])
    mixing = Mixing(perm, lam, lam < 1)
    targets = mixco_targets(mixing)
    expected = np.zeros((5, 5))
    for i in range(5):
        expected[i, i] += float(lam[i])
        expected[i, int(perm[i])] += 1 - float(lam[i])
    np.testing.assert_allclose(targets.numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(targets.sum(-1).numpy(), np.ones(5), atol=1e-6)
    assert targets[1, 1] == pytest.approx(1.0)


def test_offsets_keep_partners_within_each_subjects_rows():
    rng = np.random.default_rng(5)
    sizes = (4, 6, 3)
    parts, start = [], 0
    for size in sizes:
        parts.append(Mixing.draw(size, rng).offset(start))
        start += size
    whole = Mixing.concat(parts)
    assert whole.perm.shape == (13,)
    targets = mixco_targets(whole).numpy()
    np.testing.assert_allclose(targets.sum(-1), np.ones(13), atol=1e-6)
    start = 0
    for size in sizes:
        block = slice(start, start + size)
        assert np.all((whole.perm[block].numpy() >= start) & (whole.perm[block].numpy() < start + size))
        np.testing.assert_array_equal(np.sort(whole.perm[block].numpy()), np.arange(start, start + size))
        outside = np.delete(targets[block], np.arange(start, start + size), axis=1)
        assert np.all(outside == 0)
        start += size
    # applying the joined mixing equals applying each subject's own mixing to its rows
    voxels = torch.as_tensor(rng.standard_normal((13, 4)), dtype=torch.float32)
    own = [
        Mixing(p.perm - s, p.lam, p.mixed).apply(voxels[s : s + n])
        for p, s, n in zip(parts, (0, 4, 10), sizes, strict=True)
    ]
    np.testing.assert_allclose(whole.apply(voxels).numpy(), torch.cat(own).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ losses


def test_bimixco_equals_an_explicit_row_loop():
    rng = np.random.default_rng(1)
    brain, image = _unit_rows(rng, 8, 12), _unit_rows(rng, 8, 12)
    mixing = Mixing.draw(8, np.random.default_rng(2))
    got = bimixco_loss(brain, image, mixing)  # default tau is the paper's 0.006
    want = _reference_bimixco(brain, image, mixing.perm, mixing.lam, 0.006)
    assert got.item() == pytest.approx(want, rel=1e-4)
    other_tau = bimixco_loss(brain, image, mixing, temperature=0.05)
    assert other_tau.item() == pytest.approx(_reference_bimixco(brain, image, mixing.perm, mixing.lam, 0.05), rel=1e-4)


def test_bimixco_equals_cross_entropy_with_probability_targets():
    rng = np.random.default_rng(3)
    brain, image = _unit_rows(rng, 10, 6), _unit_rows(rng, 10, 6)
    perm = torch.tensor([3, 1, 0, 2, 9, 5, 8, 7, 6, 4])  # fixed points 1, 5, 7
    lam = torch.tensor([0.1, 0.7, 1.0, 0.99, 0.5, 0.3, 1.0, 0.02, 0.6, 1.0])
    mixing = Mixing(perm, lam, lam < 1)
    soft = torch.zeros(10, 10)
    for i in range(10):
        soft[i, i] += lam[i]
        soft[i, perm[i]] += 1 - lam[i]
    logits = brain @ image.T / 0.006
    want = (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft.T)) / 2
    assert bimixco_loss(brain, image, mixing).item() == pytest.approx(want.item(), rel=1e-5)


def test_bimixco_without_mixing_is_the_clip_loss():
    rng = np.random.default_rng(4)
    brain, image = _unit_rows(rng, 7, 5), _unit_rows(rng, 7, 5)
    mixing = Mixing(torch.tensor([6, 0, 1, 2, 3, 4, 5]), torch.ones(7), torch.zeros(7, dtype=torch.bool))
    logits = brain @ image.T / 0.006
    labels = torch.arange(7)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert bimixco_loss(brain, image, mixing).item() == pytest.approx(want.item(), rel=1e-5)


def test_soft_clip_equals_an_explicit_row_loop():
    rng = np.random.default_rng(6)
    brain, image = _unit_rows(rng, 8, 10), _unit_rows(rng, 8, 10)
    for tau in (0.004, 0.0075, 0.1):
        want = _reference_soft_clip(brain, image, tau)
        assert soft_clip_loss(brain, image, tau).item() == pytest.approx(want, rel=1e-4)


def test_soft_clip_is_smallest_when_brain_equals_image():
    """Cross-entropy H(p, q) >= H(p): with brain == image both directions reach the targets' entropy."""
    rng = np.random.default_rng(8)
    image = _unit_rows(rng, 6, 4)
    tau = 0.5
    soft = (image @ image.T / tau).softmax(-1)
    entropy = -(soft * soft.log()).sum(-1).mean()
    assert soft_clip_loss(image, image, tau).item() == pytest.approx(entropy.item(), rel=1e-5)
    for _ in range(5):
        brain = F.normalize(image + 0.3 * _unit_rows(rng, 6, 4), dim=-1)
        assert soft_clip_loss(brain, image, tau).item() > entropy.item()


@pytest.mark.parametrize("kind", ["bimixco", "softclip"])
def test_contrastive_gradients_are_finite_and_nonzero(kind):
    rng = np.random.default_rng(9)
    tokens = torch.tensor(rng.standard_normal((6, 3, 4)), dtype=torch.float32, requires_grad=True)
    image = normalised_rows(torch.as_tensor(rng.standard_normal((6, 3, 4)), dtype=torch.float32))
    brain = normalised_rows(tokens)
    if kind == "bimixco":
        loss = bimixco_loss(brain, image, Mixing.draw(6, np.random.default_rng(1)))
    else:
        loss = soft_clip_loss(brain, image, SOFTCLIP_TEMPERATURES[0])
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(tokens.grad).all()
    assert tokens.grad.abs().sum() > 0


def test_softclip_temperatures_are_the_cosine_anneal():
    temps = softclip_temperatures(101)
    assert len(temps) == 101
    assert temps[0] == pytest.approx(0.004, rel=1e-12)
    assert temps[-1] == pytest.approx(0.0075, rel=1e-12)
    assert temps[50] == pytest.approx((0.004 + 0.0075) / 2, rel=1e-12)
    assert all(a <= b for a, b in zip(temps, temps[1:], strict=False))
    fraction = np.linspace(0.0, 1.0, 101)
    want = 0.004 + (0.0075 - 0.004) * (1 - np.cos(np.pi * fraction)) / 2
    np.testing.assert_allclose(temps, want, rtol=1e-12)
    assert softclip_temperatures(2) == pytest.approx([0.004, 0.0075])
    assert softclip_temperatures(1) == pytest.approx([0.004])
    assert softclip_temperatures(0) == []
    assert softclip_temperatures(3, 1.0, 3.0) == pytest.approx([1.0, 2.0, 3.0])


def test_low_level_l1_is_the_mean_absolute_difference():
    rng = np.random.default_rng(10)
    predicted = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    target = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    want = float(np.mean(np.abs(predicted.astype(np.float64) - target)))
    got = low_level_l1(torch.as_tensor(predicted).half(), torch.as_tensor(target))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=2e-3)
    assert low_level_l1(torch.as_tensor(predicted), torch.as_tensor(target)).item() == pytest.approx(want, rel=1e-6)


def test_normalised_flattens_and_l2_normalises_each_row():
    rng = np.random.default_rng(12)
    tokens = rng.standard_normal((3, 4, 5))
    got = normalised_rows(torch.as_tensor(tokens, dtype=torch.float16))
    assert got.shape == (3, 20) and got.dtype == torch.float32
    flat = tokens.reshape(3, 20)
    want = flat / np.sqrt((flat**2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got.numpy(), axis=1), np.ones(3), rtol=1e-5)
