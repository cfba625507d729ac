"""The paper's retrieval protocol (spec §6): top-1 both ways over random n-way draws.

Brain and image embeddings are rows (flattened and L2-normalised by the caller, or here with
:func:`normalised_rows`). Each of ``n_draws`` draws picks ``n_way`` items without replacement from a fixed seed, so
two models (or two epochs) are compared on the same draws. Forward is brain -> image top-1 over the cosine matrix
(each brain row finds its own image among the drawn ones), backward is image -> brain. The result is the mean over
draws and a normal 95% half-width. With fewer items than ``n_way`` every item is scored once, n-way over all of them,
and the result says so (``n_way`` is then the item count, ``n_draws`` 1). Chance is ``1 / n_way``.
"""

import dataclasses
import math

import numpy as np

from rtdecode.errors import ConfigError

DRAW_SEED = 2024
PAPER_N_WAY = 300
PAPER_N_DRAWS = 30


@dataclasses.dataclass(frozen=True)
class RetrievalScores:
    """Top-1 retrieval: means over draws, their normal 95% half-widths, and each draw's value."""

    n_way: int
    n_draws: int
    forward: float  # brain -> image
    backward: float  # image -> brain
    forward_ci95: float
    backward_ci95: float
    forward_draws: tuple[float, ...]
    backward_draws: tuple[float, ...]

    @property
    def chance(self) -> float:
        return 1.0 / self.n_way


def normalised_rows(embeddings):
    """Flatten every item (row) and L2-normalise it (a torch tensor in, float32 out)."""
    import torch.nn.functional as F

    return F.normalize(embeddings.flatten(1).float(), dim=-1)


def retrieval(
    brain, image, *, n_way: int = PAPER_N_WAY, n_draws: int = PAPER_N_DRAWS, seed: int = DRAW_SEED
) -> RetrievalScores:
    """Top-1 both ways over ``n_draws`` random ``n_way`` subsets of the rows of ``brain`` and ``image`` (torch
    tensors of normalised rows, row i of each the same item)."""
    import torch

    n_items = _check_rows(brain, image)
    if n_way < 2 or n_draws < 1:
        raise ConfigError(f"retrieval: n_way must be at least 2 and n_draws at least 1, got {n_way} and {n_draws}")
    n_way = min(n_way, n_items)
    n_draws = n_draws if n_way < n_items else 1
    rng = np.random.default_rng(seed)
    forward, backward = [], []
    truth = torch.arange(n_way, device=brain.device)
    for _ in range(n_draws):
        pick = torch.as_tensor(np.sort(rng.choice(n_items, size=n_way, replace=False)), device=brain.device)
        similarity = brain[pick].float() @ image[pick].float().T
        forward.append((similarity.argmax(1) == truth).float().mean().item())
        backward.append((similarity.argmax(0) == truth).float().mean().item())
    return RetrievalScores(
        n_way, n_draws, _mean(forward), _mean(backward), ci95(forward), ci95(backward), tuple(forward), tuple(backward)
    )


def ci95(values: list[float]) -> float:
    """The normal 95% half-width of the mean of ``values`` (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    return float(1.96 * np.std(values, ddof=1) / math.sqrt(len(values)))


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _check_rows(brain, image) -> int:
    if brain.ndim != 2 or image.ndim != 2 or brain.shape != image.shape:
        raise ConfigError(
            f"retrieval: brain and image embeddings must be (n_items, dim) rows of one shape, got "
            f"{tuple(brain.shape)} and {tuple(image.shape)}"
        )
    if brain.shape[0] < 2:
        raise ConfigError(f"retrieval needs at least 2 items, got {brain.shape[0]}")
    return int(brain.shape[0])
