"""The image pipeline: brain embeddings -> preview, caption, unCLIP image, refined image, final blend (spec §5).

Inputs are what MindEye2 predicts for one batch of trials (the caller runs the model; this package does not import
it): the prior's bigG tokens (B, 256, 1664), the converter's CLIP-L-like tokens for the caption (B, 257, 1024), and the
low-level latent (B, 4, 28, 28). Each component loads from its folder in ``[models]`` and each can be switched off in
``[generate]``; a component that is switched on and missing is an error naming the file and the command that makes
it. Every stage is timed (milliseconds, device-synchronised) so a caller can report where the time went.

Seeds: unCLIP draws from ``seed``, refinement from ``seed + 1`` (independent noise, reproducible).
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rtdecode.config import GenerateConfig, ModelsConfig
from rtdecode.errors import ComponentMissingError, GenerateError
from rtdecode.generate.images import blend, encode_image, resize, to_uint8
from rtdecode.generate.low_level import LowLevelDecoder
from rtdecode.generate.refine import Refiner, RefineSettings
from rtdecode.generate.unclip import UnclipGenerator, UnclipSettings

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MAKERS = {
    "unclip_dir": "rtdecode model import-unclip unclip6_epoch0_step110000.ckpt --out DIR",
    "caption_dir": "a local copy of microsoft/git-large-coco (transformers save_pretrained, with its processor)",
    "refiner_dir": "a local SDXL base pipeline (diffusers save_pretrained)",
    "low_level_vae_dir": "a local SD 1.x VAE (diffusers AutoencoderKL.save_pretrained, e.g. stabilityai/sd-vae-ft-mse)",
}


@dataclasses.dataclass
class Reconstruction:
    """One trial's images (uint8 HxWx3 arrays), caption and per-stage milliseconds."""

    seed: int
    final: np.ndarray
    unclip: np.ndarray | None = None  # None with latent_handoff (never decoded)
    refined: np.ndarray | None = None
    low_level: np.ndarray | None = None
    caption: str | None = None
    timings_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    def encoded(self, which: str = "final", image_format: str = "jpeg", jpeg_quality: int = 90) -> bytes:
        """One of the images as JPEG or fast-PNG bytes."""
        pixels = getattr(self, which, None)
        if not isinstance(pixels, np.ndarray):
            raise GenerateError(f"this reconstruction has no {which!r} image")
        return encode_image(pixels, image_format, jpeg_quality)


class StageClock:
    """Milliseconds per named stage, synchronising the device so GPU work is counted where it runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings_ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start_s = time.perf_counter()
        yield
        self._sync()
        self.timings_ms[name] = self.timings_ms.get(name, 0.0) + (time.perf_counter() - start_s) * 1e3

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class ImagePipeline:
    """unCLIP plus the optional captioner, refiner and low-level decoder."""

    def __init__(
        self,
        unclip: UnclipGenerator,
        *,
        captioner=None,
        refiner: Refiner | None = None,
        low_level: LowLevelDecoder | None = None,
        settings: GenerateConfig | None = None,
    ):
        if refiner is not None and captioner is None:
            raise GenerateError(
                "refinement is guided by the caption: it needs a captioner (turn [generate] caption on)"
            )
        self.unclip = unclip
        self.captioner = captioner
        self.refiner = refiner
        self.low_level = low_level
        self.settings = settings if settings is not None else GenerateConfig()

    @classmethod
    def from_config(cls, models: ModelsConfig, settings: GenerateConfig) -> "ImagePipeline":
        """Load every switched-on component from its ``[models]`` folder."""
        device, dtype = torch.device(settings.device), TORCH_DTYPES[settings.dtype]
        if settings.refine and not settings.caption:
            raise GenerateError("[generate] refine = true needs caption = true: the refiner's prompt is the caption")
        unclip_settings = UnclipSettings(n_steps=settings.unclip_steps, guidance=settings.unclip_guidance)
        unclip = UnclipGenerator.from_folder(
            _folder(models, "unclip_dir"), device=device, dtype=dtype, **dataclasses.asdict(unclip_settings)
        )
        captioner = refiner = low_level = None
        if settings.caption:
            from rtdecode.generate.caption import Captioner

            captioner = Captioner.from_folder(_folder(models, "caption_dir"), device=device, dtype=dtype)
        if settings.refine:
            refine_settings = RefineSettings(
                n_steps=settings.refine_steps, start_step=settings.refine_start_step, guidance=settings.refine_guidance
            )
            refiner = Refiner.from_folder(
                _folder(models, "refiner_dir"), device=device, dtype=dtype, **dataclasses.asdict(refine_settings)
            )
        if settings.low_level:
            low_level = LowLevelDecoder.from_folder(_folder(models, "low_level_vae_dir"), device=device)
        return cls(unclip, captioner=captioner, refiner=refiner, low_level=low_level, settings=settings)

    @property
    def device(self) -> torch.device:
        return self.unclip.device

    def describe(self) -> str:
        """One line naming what runs, e.g. for a log or a demo summary."""
        parts = [f"unCLIP {self.unclip.settings.n_steps} steps"]
        parts.append("caption" if self.captioner else "no caption")
        if self.refiner:
            handoff = ", latent handoff" if self.settings.latent_handoff else ""
            parts.append(f"refine {len(self.refiner.settings.sigmas()) - 1} steps{handoff}")
        else:
            parts.append("no refinement")
        parts.append("low-level blend" if self.low_level else "no low-level blend")
        return ", ".join(parts)

    @torch.no_grad()
    def preview(self, low_level_latents: Tensor) -> list[np.ndarray]:
        """The fast half of the preview: low-level images (uint8, 224 for MindEye2) within one small decode."""
        if self.low_level is None:
            raise GenerateError("no low-level decoder: set [models] low_level_vae_dir and [generate] low_level = true")
        return [to_uint8(image) for image in self.low_level.decode(low_level_latents)]

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        *,
        seed: int,
        caption_features: Tensor | None = None,
        low_level_latents: Tensor | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> list[Reconstruction]:
        """Full reconstructions for a batch; ``seed`` makes them reproducible."""
        self._check_batch(tokens, caption_features, low_level_latents)
        clock = StageClock(self.device)
        captions = self._captions(caption_features, clock, on_stage)
        with clock.stage("unclip"):
            latents = self.unclip.sample(tokens, seed)
        unclip_images = None
        if self.refiner is None or not self.settings.latent_handoff:
            with clock.stage("unclip_decode"):
                unclip_images = self.unclip.decode(latents)
        refined = self._refined(latents, unclip_images, captions, seed + 1, clock, on_stage)
        low = None
        if self.low_level is not None and low_level_latents is not None:
            with clock.stage("low_level_decode"):
                low = self.low_level.decode(low_level_latents)
        with clock.stage("blend"):
            base = refined if refined is not None else unclip_images
            final = resize(base, self.settings.output_size_px) if low is None else self._blend(base, low)
        return [
            Reconstruction(
                seed=seed,
                final=to_uint8(final[i]),
                unclip=None if unclip_images is None else to_uint8(unclip_images[i]),
                refined=None if refined is None else to_uint8(refined[i]),
                low_level=None if low is None else to_uint8(low[i]),
                caption=None if captions is None else captions[i],
                timings_ms=dict(clock.timings_ms),
            )
            for i in range(tokens.shape[0])
        ]

    def _captions(self, features: Tensor | None, clock: StageClock, on_stage) -> list[str] | None:
        if self.captioner is None:
            return None
        if features is None:
            raise GenerateError("caption is on but no caption_features were given (the converter's CLIP-L tokens)")
        if on_stage:
            on_stage("caption")
        with clock.stage("caption"):
            return self.captioner.caption(features, max_length=self.settings.caption_max_length)

    def _refined(self, latents, unclip_images, captions, seed: int, clock: StageClock, on_stage) -> Tensor | None:
        if self.refiner is None:
            return None
        if on_stage:
            on_stage("refine")
        with clock.stage("refine"):
            if self.settings.latent_handoff:
                return self.refiner.decode(self.refiner.refine_latents(latents, captions, seed))
            return self.refiner.refine(unclip_images, captions, seed)

    def _blend(self, base: Tensor, low: Tensor) -> Tensor:
        return blend(base.to(low.device), low, self.settings.blend_weight, self.settings.output_size_px)

    def _check_batch(self, tokens: Tensor, *others: Tensor | None) -> None:
        if not isinstance(tokens, Tensor) or tokens.ndim != 3:
            raise GenerateError(
                f"tokens must be a (batch, n_tokens, width) tensor, got {getattr(tokens, 'shape', tokens)}"
            )
        for other in others:
            if other is not None and other.shape[0] != tokens.shape[0]:
                raise GenerateError(f"batch sizes differ: tokens {tokens.shape[0]}, other input {other.shape[0]}")


def _folder(models: ModelsConfig, field: str) -> Path:
    folder = getattr(models, field)
    if folder is None:
        raise ComponentMissingError(f"[models] {field} is not set; make it with: {_MAKERS[field]}")
    if not Path(folder).is_dir():
        raise ComponentMissingError(f"[models] {field} = {folder}: folder not found; make it with: {_MAKERS[field]}")
    return Path(folder)
