"""MindEye2's training losses (spec §3.3), written from the spec: BiMixCo, SoftCLIP, the low-level L1.

All contrastive losses take L2-normalised, flattened embeddings: ``brain`` (B, D) from ``clip_voxels``
and ``image`` (B, D) from the bigG tokens of the batch's images.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MIXCO_BETA = 0.15  # lambda ~ Beta(0.15, 0.15)
MIXCO_SELECT_PROB = 0.5  # a random half of the samples is mixed
MIXCO_TEMPERATURE = 0.006
SOFTCLIP_TEMPERATURES = (0.004, 0.0075)  # cosine-annealed over the SoftCLIP epochs
VALIDATION_TEMPERATURE = 0.006


class Mixing:
    """One batch's mixing: partner ``perm``, weight ``lam`` (1 where unmixed) and which samples were mixed."""

    def __init__(self, perm: Tensor, lam: Tensor, mixed: Tensor) -> None:
        self.perm, self.lam, self.mixed = perm, lam, mixed

    @classmethod
    def draw(cls, batch: int, rng: np.random.Generator, device: torch.device | str = "cpu") -> "Mixing":
        """Partners, Beta(0.15, 0.15) weights and the mixed half, from ``rng`` (the loop's per-step generator)."""
        perm = torch.as_tensor(rng.permutation(batch), dtype=torch.long)
        lam = torch.as_tensor(rng.beta(MIXCO_BETA, MIXCO_BETA, batch), dtype=torch.float32)
        mixed = torch.as_tensor(rng.random(batch) <= MIXCO_SELECT_PROB)
        lam = torch.where(mixed, lam, torch.ones_like(lam))
        return cls(perm.to(device), lam.to(device), mixed.to(device))

    def offset(self, start: int) -> "Mixing":
        """The same mixing with partner indices shifted by ``start`` (a subject's rows in the whole batch)."""
        return Mixing(self.perm + start, self.lam, self.mixed)

    def apply(self, voxels: Tensor) -> Tensor:
        """``lam * x + (1 - lam) * x[perm]`` row by row (rows not mixed have lam = 1)."""
        lam = self.lam.to(voxels.dtype).reshape(-1, *([1] * (voxels.ndim - 1)))
        return voxels * lam + voxels[self.perm] * (1 - lam)

    @staticmethod
    def concat(parts: list["Mixing"]) -> "Mixing":
        """Join per-subject mixings (each already offset to its rows) into the whole batch's."""
        return Mixing(
            torch.cat([p.perm for p in parts]), torch.cat([p.lam for p in parts]), torch.cat([p.mixed for p in parts])
        )


def mixco_targets(mixing: Mixing) -> Tensor:
    """Soft labels of BiMixCo: lam at the sample itself, 1 - lam at its partner (summed when they coincide)."""
    batch = mixing.lam.shape[0]
    rows = torch.arange(batch, device=mixing.lam.device)
    targets = torch.zeros(batch, batch, device=mixing.lam.device, dtype=torch.float32)
    targets[rows, rows] = mixing.lam.float()
    targets.index_put_((rows, mixing.perm), 1 - mixing.lam.float(), accumulate=True)
    return targets


def bimixco_loss(brain: Tensor, image: Tensor, mixing: Mixing, temperature: float = MIXCO_TEMPERATURE) -> Tensor:
    """Bidirectional soft-label cross-entropy of ``brain @ image.T / tau`` against :func:`mixco_targets`.

    The public ``mixco_nce`` sets ``probs[i, perm[i]] = 1 - lam`` after the diagonal, so a sample paired with
    itself gets 1 - lam instead of 1; here the two add up to 1, which is the loss the paper writes.
    """
    logits = brain.float() @ image.float().T / temperature
    targets = mixco_targets(mixing)
    forward = -(logits.log_softmax(-1) * targets).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * targets.T).sum(-1).mean()
    return (forward + backward) / 2


def soft_clip_loss(brain: Tensor, image: Tensor, temperature: float) -> Tensor:
    """SoftCLIP: cross-entropy of ``brain @ image.T / tau`` against softmax(``image @ image.T / tau``), both ways."""
    image = image.float()
    logits = brain.float() @ image.T / temperature
    soft = (image @ image.T / temperature).softmax(-1)
    forward = -(logits.log_softmax(-1) * soft).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * soft).sum(-1).mean()
    return (forward + backward) / 2


def softclip_temperatures(
    n_epochs: int, start: float = SOFTCLIP_TEMPERATURES[0], end: float = SOFTCLIP_TEMPERATURES[1]
):
    """One temperature per SoftCLIP epoch: ``end + (start - end)/2 * (1 + cos(pi k / (n - 1)))``, k = 0..n-1."""
    if n_epochs <= 0:
        return []
    if n_epochs == 1:
        return [start]
    return [end + (start - end) / 2 * (1 + math.cos(math.pi * k / (n_epochs - 1))) for k in range(n_epochs)]


def low_level_l1(predicted_latent: Tensor, target_latent: Tensor) -> Tensor:
    """L1 between the predicted SD-VAE latent and the image's (already x 0.18215) latent."""
    return F.l1_loss(predicted_latent.float(), target_latent.float())
