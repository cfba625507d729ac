"""Per-epoch validation: the paper's 300-way retrieval, both directions, 30 random draws (spec §3.2, §6).

For each subject, every repetition of each test image goes through the model (ridge + backbone, eval
mode); the ``clip_voxels`` of the three repetitions are averaged *after* the model, as the public code
does. Each draw picks ``n_way`` test images without replacement; forward retrieval is brain -> image
top-1 over the cosine matrix, backward is image -> brain. Draws come from a fixed seed, so epochs are
compared on the same draws. A subject with fewer test images than ``n_way`` is scored n-way over all of
them (every draw is then the same set) and the result says so.
"""

import dataclasses

import numpy as np
import torch
from torch import Tensor

from rtdecode.evaluate.retrieval import DRAW_SEED, PAPER_N_DRAWS, PAPER_N_WAY, normalised_rows
from rtdecode.evaluate.retrieval import retrieval as retrieval_scores
from rtdecode.models.mindeye2 import MindEye2
from trainer.data.source import Dataset, SubjectData
from trainer.losses import VALIDATION_TEMPERATURE, soft_clip_loss


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Top-1 retrieval of one subject: means over draws and their normal 95% half-widths."""

    subject: str
    n_way: int
    n_draws: int
    forward: float
    backward: float
    forward_ci95: float
    backward_ci95: float
    loss: float  # SoftCLIP (tau 0.006) over the first n_way test images

    @property
    def chance(self) -> float:
        return 1.0 / self.n_way

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TestImages:
    """Normalised target tokens of every subject's test images, embedded once (they never change).

    Stored in fp16 on the device: NSD's 1000 shared images are 0.85 GB flattened, instead of 1.7 GB per
    subject per epoch; each draw's rows are compared in float32.
    """

    def __init__(self, images: np.ndarray, embeddings: Tensor) -> None:
        self.index = {int(image): row for row, image in enumerate(images)}
        self.embeddings = embeddings

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: Dataset, tokens, device: torch.device, batch_size: int = 64) -> "TestImages":
        images = np.unique(np.concatenate([s.test_images for s in dataset.subjects]))
        chunks = [
            normalised_rows(tokens.get(images[start : start + batch_size]).to(device)).half()
            for start in range(0, images.size, batch_size)
        ]
        return cls(images, torch.cat(chunks))

    def rows(self, images: np.ndarray) -> Tensor:
        """The embeddings of ``images``, in that order."""
        picked = torch.as_tensor([self.index[int(i)] for i in images], device=self.embeddings.device)
        return self.embeddings[picked]


@torch.no_grad()
def subject_embeddings(model: MindEye2, subject: SubjectData, index: int, batch_size: int = 64) -> Tensor:
    """Normalised, repetition-averaged clip_voxels of the subject's test images, fp16 (n_test_images, D)."""
    weight = model.ridge.linears[index].weight
    chunks = []
    for start in range(0, subject.n_test_images, batch_size):
        rows = subject.test_rows[start : start + batch_size]  # (b, reps)
        voxels = torch.as_tensor(subject.betas[rows.reshape(-1)], dtype=weight.dtype, device=weight.device)
        clip_voxels = model.embed(voxels, subject.name).clip_voxels.float()
        averaged = clip_voxels.reshape(rows.shape[0], rows.shape[1], *clip_voxels.shape[1:]).mean(1)
        chunks.append(normalised_rows(averaged).half())
    return torch.cat(chunks)


def retrieval(
    brain: Tensor,
    image: Tensor,
    subject: str,
    *,
    n_way: int = PAPER_N_WAY,
    n_draws: int = PAPER_N_DRAWS,
    seed: int = DRAW_SEED,
) -> Retrieval:
    """Top-1 both ways over ``n_draws`` random ``n_way`` subsets of the rows of ``brain``/``image`` (normalised; the
    protocol is :func:`rtdecode.evaluate.retrieval.retrieval`), plus the SoftCLIP loss over the first ``n_way``."""
    scores = retrieval_scores(brain, image, n_way=n_way, n_draws=n_draws, seed=seed)
    first = torch.arange(scores.n_way, device=brain.device)
    loss = soft_clip_loss(brain[first], image[first], VALIDATION_TEMPERATURE).item()
    return Retrieval(
        subject, scores.n_way, scores.n_draws, scores.forward, scores.backward, scores.forward_ci95,
        scores.backward_ci95, loss,
    )  # fmt: skip
