"""SDXL img2img refinement guided by the predicted caption (spec §5.2).

MindEye2 refines the unCLIP image with a base SDXL model (the public run used a community fine-tune; any SDXL
base folder works):

* **Text conditioning.** The caption as prompt and a fixed negative prompt, through SDXL's two text encoders (CLIP-L
  and bigG penultimate layers concatenated to 77x2048; bigG's pooled projection, 1280 wide). diffusers'
  ``StableDiffusionXLPipeline.encode_prompt`` computes exactly sgm's conditioner here. The added vector is that pooled
  embedding followed by the sinusoids of (original 768, 768; crop 0, 0; target 1024, 1024).
* **Start.** The 768 unCLIP image is encoded by the SDXL VAE (``2x - 1``, a sample of the posterior, times the scale
  factor) and noised to the 14th sigma of a 25-step grid (sigma 1.5092, DDPM index 479, about half-way):
  ``z + n * sigma``.
* **Steps.** The remaining 12 Euler steps with guidance 5 (:mod:`rtdecode.generate.sampler`).
* **Output.** ``clamp((decode(z / scale) + 1) / 2, 0, 1)`` at 768.

The named speed option ``latent_handoff`` starts from the unCLIP latent itself: both models share the SDXL VAE latent
space, so a VAE decode and encode are skipped, and with them the published ``x * 0.8 + 0.2`` colour mapping between
the two models. Off by default.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rtdecode.errors import ComponentMissingError, GenerateError
from rtdecode.generate.sampler import (
    Conditioning,
    EpsDenoiser,
    NoiseNet,
    euler_sample,
    sampling_sigmas,
    unet_noise_net,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

NEGATIVE_PROMPT = (
    "painting, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, deformed, ugly, blurry, "
    "bad anatomy, bad proportions, extra limbs, cloned face, skinny, glitchy, double torso, extra arms, extra hands, "
    "mangled fingers, missing lips, ugly face, distorted face, extra legs, anime"
)
REFINER_PARTS = (
    "model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """The img2img settings; the defaults are MindEye2's (12 of 25 steps, guidance 5)."""

    n_steps: int = 25
    start_step: int = 13
    guidance: float = 5.0
    negative_prompt: str = NEGATIVE_PROMPT
    original_size_px: tuple[int, int] = (768, 768)
    crop_px: tuple[int, int] = (0, 0)
    target_size_px: tuple[int, int] = (1024, 1024)

    def sigmas(self) -> Tensor:
        """The sigmas the refinement walks: the grid from ``start_step`` on (12 steps by default)."""
        if not 1 <= self.start_step < self.n_steps:
            raise GenerateError(f"refine start_step must be in 1..{self.n_steps - 1}, got {self.start_step}")
        return sampling_sigmas(self.n_steps)[self.start_step :]


class Refiner:
    """An SDXL base pipeline used for MindEye2's img2img refinement."""

    def __init__(self, pipeline: "StableDiffusionXLPipeline", settings: RefineSettings = RefineSettings()):
        self.pipeline = pipeline
        self.unet = pipeline.unet.eval()
        self.vae = pipeline.vae.eval()
        self.settings = settings
        self.scale_factor = float(self.vae.config.scaling_factor)
        self._denoiser = EpsDenoiser(unet_noise_net(self.unet), net_dtype=self.unet.dtype)
        self._vae_decode: Callable[[Tensor], Tensor] = lambda latents: self.vae.decode(latents).sample
        self._vae_encode: Callable[[Tensor], tuple[Tensor, Tensor]] = self._posterior

    def use_networks(
        self,
        *,
        noise_net: NoiseNet | None = None,
        vae_decode: Callable[[Tensor], Tensor] | None = None,
        vae_encode: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Run the UNet (``noise_net``: float32 in, float32 noise out), the VAE decoder (latent already divided by
        the scale -> image) or the VAE encoder (image in [-1, 1] -> posterior mean and std) through other callables,
        e.g. compiled engines; sampling and noise draws are unchanged."""
        if noise_net is not None:
            self._denoiser = EpsDenoiser(noise_net, net_dtype=torch.float32)
        if vae_decode is not None:
            self._vae_decode = vae_decode
        if vae_encode is not None:
            self._vae_encode = vae_encode

    @classmethod
    def from_folder(
        cls, folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **settings
    ) -> "Refiner":
        """Load an SDXL base folder (diffusers ``save_pretrained`` layout); the VAE stays in float32."""
        from diffusers import StableDiffusionXLPipeline

        folder = Path(folder)
        for part in REFINER_PARTS:
            if not (folder / part).exists():
                raise ComponentMissingError(
                    f"refiner: {folder / part} not found; [models] refiner_dir must be an SDXL base pipeline saved "
                    "with diffusers' save_pretrained (e.g. a local copy of stabilityai/stable-diffusion-xl-base-1.0, "
                    "or a single-file fine-tune converted with StableDiffusionXLPipeline.from_single_file(...)"
                    ".save_pretrained(DIR))"
                )
        dtypes = {"default": dtype, "vae": torch.float32}
        pipeline = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtypes, local_files_only=True)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, RefineSettings(**settings))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @torch.no_grad()
    def encode_image(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """SDXL VAE latents of images (B, 3, H, W) in [0, 1], sampled from the posterior as sgm does."""
        pixels = images.to(self.vae.device, torch.float32) * 2.0 - 1.0
        mean, std = self._vae_encode(pixels)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * noise) * self.scale_factor

    @torch.no_grad()
    def refine_latents(self, latents: Tensor, captions: list[str], seed: int) -> Tensor:
        """Refined latents from SDXL-space latents (the ``latent_handoff`` path)."""
        return self._refine(latents, captions, torch.Generator("cpu").manual_seed(seed))

    @torch.no_grad()
    def refine(self, images: Tensor, captions: list[str], seed: int) -> Tensor:
        """Refined images (B, 3, H, W) in [0, 1] from images in [0, 1] (the published path)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = self.encode_image(images, generator)
        return self.decode(self._refine(latents, captions, generator))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from SDXL latents: float32 VAE, ``(x + 1) / 2``."""
        decoded = self._vae_decode(latents.to(self.vae.device, torch.float32) / self.scale_factor)
        return ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def _posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std

    def _refine(self, latents: Tensor, captions: list[str], generator: torch.Generator) -> Tensor:
        """Noise the latents to the start sigma and run the remaining steps under the captions."""
        if len(captions) != latents.shape[0]:
            raise GenerateError(f"refine: {len(captions)} captions for a batch of {latents.shape[0]} latents")
        sigmas = self.settings.sigmas()
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        start = latents.float() + noise * sigmas[0]
        cond, uncond = self._conditioning(captions)
        return euler_sample(self._denoiser, start, sigmas, cond, uncond, self.settings.guidance)

    def _conditioning(self, captions: list[str]) -> tuple[Conditioning, Conditioning]:
        batch = len(captions)
        context, uncontext, pooled, unpooled = self.pipeline.encode_prompt(
            prompt=captions,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[self.settings.negative_prompt] * batch,
        )
        numbers = (*self.settings.original_size_px, *self.settings.crop_px, *self.settings.target_size_px)
        time_ids = torch.tensor([numbers], dtype=self.unet.dtype, device=self.device).expand(batch, -1)
        dtype = self.unet.dtype
        cond = Conditioning(context.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids})
        uncond = Conditioning(uncontext.to(dtype), {"text_embeds": unpooled.to(dtype), "time_ids": time_ids})
        return cond, uncond
