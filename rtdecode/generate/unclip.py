"""SDXL unCLIP: MindEye2's predicted bigG tokens -> a 768x768 image, sampled as the public code does (spec §5.1).

* **Conditioning.** Cross-attention on the 256x1664 tokens. The unconditional half of guidance gets standard
  Gaussian noise tokens of the same shape, not zeros. The 1024-wide added vector is the sinusoidal embedding of
  (original height, original width, crop top, crop left) = (768, 768, 0, 0), the same for both halves; there is no
  pooled text (diffusers: ``text_embeds`` of width 0, ``time_ids`` of the four numbers).
* **Start latent.** ``(z + (n + 0.04 * offset) * sigma_0) / sqrt(1 + sigma_0^2)`` with ``z``, ``n`` standard normal
  latents and ``offset`` one standard normal scalar per sample; the sampler multiplies by ``sqrt(1 + sigma_0^2)``
  again, so the loop starts at ``z + (n + 0.04 * offset) * sigma_0``.
* **Sampler.** 38 Euler steps of :mod:`rtdecode.generate.sampler`, guidance 5.
* **Output.** The SDXL VAE (float32) decodes ``latent / 0.13025``; the image is ``clamp(x * 0.8 + 0.2, 0, 1)``, not
  ``(x + 1) / 2``: the public mapping, reproduced.

Random draws are made on the CPU from one generator seeded per call, in the order z, unconditional tokens, n,
offset (the public function's order), so a seed gives the same start on every device.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rtdecode.errors import GenerateError
from rtdecode.generate.sampler import (
    Conditioning,
    EpsDenoiser,
    NoiseNet,
    euler_sample,
    sampling_sigmas,
    unet_noise_net,
)

OFFSET_NOISE = 0.04
OUTPUT_SCALE = 0.8
OUTPUT_SHIFT = 0.2


@dataclasses.dataclass(frozen=True)
class UnclipSettings:
    """Sampler settings; the defaults are MindEye2's."""

    n_steps: int = 38
    guidance: float = 5.0
    size_px: int | None = None  # None: the UNet's own sample size (768 for the published model)
    original_size_px: tuple[int, int] = (768, 768)
    crop_px: tuple[int, int] = (0, 0)
    offset_noise: float = OFFSET_NOISE


class UnclipGenerator:
    """unCLIP UNet + SDXL VAE; :meth:`sample` gives latents, :meth:`decode` images in [0, 1]."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, settings: UnclipSettings = UnclipSettings()):
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.settings = settings
        self.context_dim = int(unet.config.cross_attention_dim)
        self.scale_factor = float(vae.config.scaling_factor)
        self.vae_downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_px = settings.size_px or int(unet.config.sample_size) * self.vae_downscale
        if self.size_px % self.vae_downscale:
            raise GenerateError(f"unCLIP size_px must be a multiple of {self.vae_downscale}, got {self.size_px}")
        self._denoiser = EpsDenoiser(unet_noise_net(self.unet), net_dtype=unet.dtype)
        self._vae_decode: Callable[[Tensor], Tensor] = lambda latents: self.vae.decode(latents).sample

    def use_networks(
        self, *, noise_net: NoiseNet | None = None, vae_decode: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Run the UNet (``noise_net``: float32 in, float32 noise out) or the VAE decoder (latent already divided by
        the scale -> image) through other callables, e.g. compiled engines; sampling is unchanged."""
        if noise_net is not None:
            self._denoiser = EpsDenoiser(noise_net, net_dtype=torch.float32)
        if vae_decode is not None:
            self._vae_decode = vae_decode

    @classmethod
    def from_folder(
        cls, folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **settings
    ) -> "UnclipGenerator":
        """Load a folder written by ``rtdecode model import-unclip`` (or :func:`write_random_unclip`)."""
        from rtdecode.generate.unclip_folder import load_unclip

        unet, vae, _geometry = load_unclip(Path(folder), device=device, dtype=dtype)
        return cls(unet, vae, UnclipSettings(**settings))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.size_px // self.vae_downscale
        return (int(self.unet.config.in_channels), side, side)

    @torch.no_grad()
    def sample(self, tokens: Tensor, seed: int) -> Tensor:
        """Latents (B, 4, 96, 96) for bigG tokens (B, 256, 1664); the same seed gives the same latents."""
        tokens = self._checked_tokens(tokens)
        generator = torch.Generator("cpu").manual_seed(seed)
        batch = tokens.shape[0]
        z = torch.randn((batch, *self.latent_shape), generator=generator)
        noise_tokens = torch.randn(tokens.shape, generator=generator)
        noise = torch.randn(z.shape, generator=generator)
        offset = torch.randn(batch, generator=generator).view(-1, 1, 1, 1)
        sigmas = sampling_sigmas(self.settings.n_steps)
        start = z + (noise + self.settings.offset_noise * offset) * sigmas[0]
        cond = self._conditioning(tokens)
        uncond = self._conditioning(noise_tokens.to(self.device, tokens.dtype))
        x = start.to(self.device)
        return euler_sample(self._denoiser, x, sigmas, cond, uncond, self.settings.guidance)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, 768, 768) in [0, 1]: float32 VAE decode, then the published ``x * 0.8 + 0.2``."""
        vae_dtype = next(self.vae.parameters()).dtype
        decoded = self._vae_decode(latents.to(self.vae.device, vae_dtype) / self.scale_factor)
        return (decoded.float() * OUTPUT_SCALE + OUTPUT_SHIFT).clamp(0.0, 1.0)

    def _conditioning(self, tokens: Tensor) -> Conditioning:
        batch = tokens.shape[0]
        numbers = (*self.settings.original_size_px, *self.settings.crop_px)
        time_ids = torch.tensor([numbers], dtype=self.unet.dtype, device=self.device).expand(batch, -1)
        text_embeds = torch.zeros((batch, 0), dtype=self.unet.dtype, device=self.device)
        return Conditioning(tokens.to(self.unet.dtype), {"text_embeds": text_embeds, "time_ids": time_ids})

    def _checked_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[-1] != self.context_dim:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise GenerateError(
                f"unCLIP tokens must have shape (batch, n_tokens, {self.context_dim}) (MindEye2: (B, 256, 1664)), "
                f"got {shape}"
            )
        if not torch.isfinite(tokens).all():
            raise GenerateError(f"unCLIP tokens contain NaN or inf ({int((~torch.isfinite(tokens)).sum())} values)")
        return tokens.to(self.device, torch.float32)
