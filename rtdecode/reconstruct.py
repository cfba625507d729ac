"""Betas in, images out: the GPU side of the data flow, joining MindEye2 (``rtdecode.models``) to the image pipeline
(``rtdecode.generate``), which do not import each other.

A trial is decoded in two steps so the operator sees something at once:

1. :meth:`Reconstructor.preview`: embed the beta (ridge, backbone, heads; milliseconds), look up the closest images
   of the retrieval pool, and decode the low-level latent (one small VAE decode). Publish this first.
2. :meth:`Reconstructor.reconstruct`: the diffusion prior (20 DDIM steps), the bigG->CLIP-L converter for the
   caption, then captioning, unCLIP, refinement and the blend.
"""

import dataclasses

import numpy as np
import torch
from torch import Tensor

from rtdecode.generate.pipeline import ImagePipeline, Reconstruction, StageClock
from rtdecode.models.backbone import BrainOutputs
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.retrieval import Match, RetrievalIndex

PRIOR_STEPS = 20


@dataclasses.dataclass
class Preview:
    """What is ready within milliseconds of the beta: retrieval matches and low-level images (uint8)."""

    outputs: BrainOutputs
    matches: list[list[Match]] | None
    low_level: list[np.ndarray] | None
    timings_ms: dict[str, float]


class Reconstructor:
    """One subject's MindEye2 model with the image pipeline and, optionally, a retrieval pool."""

    def __init__(
        self,
        model: MindEye2,
        subject: str,
        pipeline: ImagePipeline,
        *,
        converter: CLIPConverter | None = None,
        retrieval: RetrievalIndex | None = None,
        n_matches: int = 5,
        n_prior_steps: int = PRIOR_STEPS,
    ):
        model.config.subject_index(subject)  # an unknown subject fails here, naming the known ones
        self.model = model.eval()
        self.subject = subject
        self.pipeline = pipeline
        self.converter = converter
        self.retrieval = retrieval
        self.n_matches = n_matches
        self.n_prior_steps = n_prior_steps

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def preview(self, voxels: Tensor | np.ndarray) -> Preview:
        """Embed betas (B, n_voxels), retrieve, and decode the low-level latent when both exist."""
        clock = StageClock(self.device)
        dtype = next(self.model.parameters()).dtype
        batch = torch.as_tensor(np.asarray(voxels) if not isinstance(voxels, Tensor) else voxels)
        with clock.stage("embed"):
            outputs = self.model.embed(batch.to(self.device, dtype), self.subject)
        matches = low_level = None
        if self.retrieval is not None and outputs.clip_voxels is not None:
            with clock.stage("retrieval"):
                matches = self.retrieval.search(outputs.clip_voxels.float(), k=min(self.n_matches, len(self.retrieval)))
        if self.pipeline.low_level is not None and outputs.low_level_latent is not None:
            with clock.stage("low_level_preview"):
                low_level = self.pipeline.preview(outputs.low_level_latent.float())
        return Preview(outputs, matches, low_level, dict(clock.timings_ms))

    @torch.no_grad()
    def reconstruct(self, preview: Preview, seed: int) -> list[Reconstruction]:
        """The full images for the trials of ``preview``; the same seed gives the same images."""
        clock = StageClock(self.device)
        with clock.stage("prior"):
            tokens = self.model.sample_prior(preview.outputs.backbone, n_steps=self.n_prior_steps, seed=seed)
        features = None
        if self.pipeline.captioner is not None and self.converter is not None:
            with clock.stage("converter"):
                features = self.converter(tokens.to(next(self.converter.parameters()).dtype))
        latents = preview.outputs.low_level_latent
        results = self.pipeline.generate(
            tokens.float(),
            seed=seed,
            caption_features=features,
            low_level_latents=None if latents is None else latents.float(),
        )
        for result in results:
            result.timings_ms = {**preview.timings_ms, **clock.timings_ms, **result.timings_ms}
        return results
