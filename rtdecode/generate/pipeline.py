"""The image pipeline: brain embeddings -> preview, caption, unCLIP image, refined image, final blend (spec §5).

Inputs are what MindEye2 predicts for one batch of trials (the caller runs the model; this package does not import
it): the prior's bigG tokens (B, 256, 1664), the converter's CLIP-L-like tokens for the caption (B, 257, 1024), and the
low-level latent (B, 4, 28, 28). Each component loads from its folder in ``[models]`` and each can be switched off in
``[generate]``; a component that is switched on and missing is an error naming the file and the command that makes
it. Every stage is timed (milliseconds, device-synchronised) so a caller can report where the time went.

Seeds: each stage draws from its own seed derived from the trial's (:func:`stage_seed`), so stages and
consecutive trials never share noise. With a batch, every sample draws from the same stage generator: a seed
reproduces a batch, not each sample of it on its own.
"""

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rtdecode.config import GenerateConfig, ModelsConfig
from rtdecode.errors import ComponentMissingError, GenerateError
from rtdecode.generate.caption import Captioner
from rtdecode.generate.images import ImageFormat, blend, encode_image, resize, to_uint8
from rtdecode.generate.low_level import LowLevelDecoder
from rtdecode.generate.refine import Refiner, RefineSettings
from rtdecode.generate.unclip import UnclipGenerator, UnclipSettings
from rtdecode.generate.unclip_folder import DTYPES

_MAKERS = {
    "unclip_dir": "rtdecode model import-unclip unclip6_epoch0_step110000.ckpt --out DIR",
    "caption_dir": 'python -c "from transformers import AutoProcessor, GitForCausalLM; '
    "[c.from_pretrained('microsoft/git-large-coco').save_pretrained('DIR') for c in (GitForCausalLM, AutoProcessor)]\" "
    "(on a machine with network)",
    "refiner_dir": 'python -c "from diffusers import StableDiffusionXLPipeline; StableDiffusionXLPipeline.'
    "from_single_file('zavychromaxl_v30.safetensors').save_pretrained('DIR')\" (any SDXL base checkpoint)",
    "low_level_vae_dir": "rtdecode model import-low-level-vae sd_image_var_autoenc.pth --out DIR",
}
_STAGE_IDS = {"prior": 0, "unclip": 1, "refine": 2}


def stage_seed(seed: int, stage: str) -> int:
    """An independent seed per stage of a trial (``prior``, ``unclip``, ``refine``), from the trial's seed."""
    return int(np.random.SeedSequence([seed, _STAGE_IDS[stage]]).generate_state(1)[0])


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

    def encoded(self, which: str = "final", image_format: ImageFormat = "jpeg", jpeg_quality: int = 90) -> bytes:
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
        captioner: Captioner | None = None,
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
        device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
        if settings.refine and not settings.caption:
            raise GenerateError("[generate] refine = true needs caption = true: the refiner's prompt is the caption")
        unclip_settings = UnclipSettings(n_steps=settings.unclip_steps, guidance=settings.unclip_guidance)
        unclip = UnclipGenerator.from_folder(
            _folder(models, "unclip_dir"), device=device, dtype=dtype, **dataclasses.asdict(unclip_settings)
        )
        captioner = refiner = low_level = None
        if settings.caption:
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
    def preview(self, low_level_latents: Tensor) -> Tensor:
        """The fast half of the preview: low-level images (B, 3, 224, 224 for MindEye2) in [0, 1]."""
        if self.low_level is None:
            raise GenerateError("no low-level decoder: set [models] low_level_vae_dir and [generate] low_level = true")
        return self.low_level.decode(low_level_latents)

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        *,
        seed: int,
        caption_features: Tensor | None = None,
        low_level_latents: Tensor | None = None,
        low_level_images: Tensor | None = None,
    ) -> list[Reconstruction]:
        """Full reconstructions for a batch; ``seed`` makes them reproducible.

        ``low_level_images`` (B, 3, H, W) in [0, 1], when the preview already decoded them, are used instead of
        decoding ``low_level_latents`` again.
        """
        self._check_batch(tokens, caption_features, low_level_latents, low_level_images)
        clock = StageClock(self.device)
        captions = self._captions(caption_features, clock)
        with clock.stage("unclip"):
            latents = self.unclip.sample(tokens, stage_seed(seed, "unclip"))
        unclip_images = None
        if self.refiner is None or not self.settings.latent_handoff:
            with clock.stage("unclip_decode"):
                unclip_images = self.unclip.decode(latents)
        refined = self._refined(latents, unclip_images, captions, stage_seed(seed, "refine"), clock)
        low = low_level_images
        if low is None and self.low_level is not None and low_level_latents is not None:
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

    def _captions(self, features: Tensor | None, clock: StageClock) -> list[str] | None:
        if self.captioner is None:
            return None
        if features is None:
            raise GenerateError("caption is on but no caption_features were given (the converter's CLIP-L tokens)")
        with clock.stage("caption"):
            return self.captioner.caption(features, max_length=self.settings.caption_max_length)

    def _refined(
        self, latents: Tensor, unclip_images: Tensor | None, captions: list[str], seed: int, clock: StageClock
    ) -> Tensor | None:
        if self.refiner is None:
            return None
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
        raise ComponentMissingError(
            f"[models] {field} is not set; make it with: {_MAKERS[field]} "
            "(or random stand-ins: rtdecode model init-image-models --out DIR)"
        )
    if not Path(folder).is_dir():
        raise ComponentMissingError(f"[models] {field} = {folder}: folder not found; make it with: {_MAKERS[field]}")
    return Path(folder)
