"""Betas in, images out: the GPU side of the data flow, joining MindEye2 (``rtdecode.models``) to the image pipeline
(``rtdecode.generate``), which do not import each other.

A trial is decoded in two steps so the operator sees something at once:

1. :meth:`Reconstructor.preview`: embed the beta (ridge, backbone, heads; milliseconds), look up the closest images
   of the retrieval pool, and decode the low-level latent (one small VAE decode). Publish this first.
2. :meth:`Reconstructor.reconstruct`: the diffusion prior (20 DDIM steps), the bigG->CLIP-L converter for the
   caption, then captioning, unCLIP, refinement and the blend.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from rtdecode.errors import GenerateError
from rtdecode.generate.images import to_uint8
from rtdecode.generate.pipeline import ImagePipeline, Reconstruction, StageClock, stage_seed
from rtdecode.models.backbone import BrainOutputs
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.retrieval import Match, RetrievalIndex

PRIOR_STEPS = 20
EngineCall = Callable[..., tuple[Tensor, ...]]  # a compiled stage: tensors in signature order -> output tensors


@dataclasses.dataclass
class Preview:
    """What is ready within milliseconds of the beta: retrieval matches and low-level images."""

    outputs: BrainOutputs
    matches: list[list[Match]] | None
    low_level_images: Tensor | None  # (B, 3, H, W) in [0, 1]; reused by the full reconstruction
    timings_ms: dict[str, float]

    @property
    def low_level(self) -> list[np.ndarray] | None:
        """The low-level images as uint8 (H, W, 3) arrays, ready to encode and publish."""
        return None if self.low_level_images is None else [to_uint8(image) for image in self.low_level_images]


class Reconstructor:
    """One subject's MindEye2 model with the image pipeline (None: previews only) and, optionally, a retrieval
    pool."""

    def __init__(
        self,
        model: MindEye2,
        subject: str,
        pipeline: ImagePipeline | None,
        *,
        converter: CLIPConverter | None = None,
        retrieval: RetrievalIndex | None = None,
        n_matches: int = 5,
        n_prior_steps: int = PRIOR_STEPS,
    ):
        model.config.subject_index(subject)  # an unknown subject fails here, naming the known ones
        if pipeline is not None and pipeline.captioner is not None and converter is None:
            raise GenerateError(
                "captions need the bigG->CLIP-L converter: pass converter= (import it into the bundle with "
                "rtdecode model import-mindeye2 ... --converter bigG_to_L_epoch8.pth), or turn [generate] caption off"
            )
        self.model = model.eval()
        self.subject = subject
        self.pipeline = pipeline
        self.converter = converter
        self.retrieval = retrieval
        self.n_matches = n_matches
        self.n_prior_steps = n_prior_steps
        self._engines: dict[str, EngineCall] = {}

    def use_engines(self, *, embed: EngineCall | None = None, low_level: EngineCall | None = None,
                    prior_step: EngineCall | None = None) -> None:  # fmt: skip
        """Run MindEye2's stages through compiled engines (:mod:`rtdecode.stage_graphs` names their inputs and
        outputs); a stage without one keeps running in torch."""
        given = {"embed": embed, "low_level": low_level, "prior_step": prior_step}
        self._engines.update({stage: engine for stage, engine in given.items() if engine is not None})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def preview(self, voxels: Tensor | np.ndarray) -> Preview:
        """Embed betas (B, n_voxels), retrieve, and decode the low-level latent when both exist."""
        clock = StageClock(self.device)
        dtype = next(self.model.parameters()).dtype
        batch = torch.as_tensor(voxels)
        with clock.stage("embed"):
            outputs = self._embed(batch.to(self.device, dtype))
        matches = low_level = None  # low_level: images (B, 3, H, W)
        if self.retrieval is not None and outputs.clip_voxels is not None:
            with clock.stage("retrieval"):
                matches = self.retrieval.search(outputs.clip_voxels.float(), k=min(self.n_matches, len(self.retrieval)))
        if self.pipeline is not None and self.pipeline.low_level is not None and outputs.low_level_latent is not None:
            with clock.stage("low_level_preview"):
                low_level = self.pipeline.preview(outputs.low_level_latent.float())
        return Preview(outputs, matches, low_level, dict(clock.timings_ms))

    @torch.no_grad()
    def reconstruct(self, preview: Preview, seed: int) -> list[Reconstruction]:
        """The full images for the trials of ``preview``; the same seed gives the same images."""
        if self.pipeline is None:
            raise GenerateError("this reconstructor has no image pipeline: it previews (embed, retrieval) only")
        clock = StageClock(self.device)
        with clock.stage("prior"):
            prior_step = self._engines.get("prior_step")
            tokens = self.model.sample_prior(
                preview.outputs.backbone,
                n_steps=self.n_prior_steps,
                seed=stage_seed(seed, "prior"),
                net=None if prior_step is None else lambda *inputs: prior_step(*inputs)[0],
            )
        features = None
        if self.pipeline.captioner is not None:
            with clock.stage("converter"):
                features = self.converter(tokens.to(next(self.converter.parameters()).dtype))
        latents = preview.outputs.low_level_latent
        results = self.pipeline.generate(
            tokens.float(),
            seed=seed,
            caption_features=features,
            low_level_latents=None if latents is None else latents.float(),
            low_level_images=preview.low_level_images,
        )
        for result in results:
            result.timings_ms = {**preview.timings_ms, **clock.timings_ms, **result.timings_ms}
        return results

    def _embed(self, batch: Tensor) -> BrainOutputs:
        """The model's heads, through the ``embed`` (and ``low_level``) engines when they are in use."""
        embed = self._engines.get("embed")
        if embed is None:
            return self.model.embed(batch, self.subject)
        parts = embed(batch)
        backbone, clip_voxels, mixed = parts if len(parts) == 3 else (parts[0], None, parts[1])
        latent = None
        if self.model.config.backbone.low_level is not None:
            low_level = self._engines.get("low_level")
            mixed = mixed.to(batch.dtype)
            latent = low_level(mixed)[0] if low_level is not None else self.model.backbone.low_level(mixed)[0]
        return BrainOutputs(backbone, clip_voxels, latent, None)
