"""Euler sampling on the legacy DDPM discretisation, as Stability's ``sgm`` code runs it (spec §5.1, second §5.3).

Both MindEye2 samplers (unCLIP and the SDXL refiner) are this one loop with different conditioning:

* **Noise levels.** The DDPM training schedule squares a linear ramp on sqrt(beta) from 0.00085 to 0.012 over 1000
  steps (diffusers calls it "scaled_linear"). A run of ``n_steps`` uses the DDPM indices
  ``int(linspace(999, 0, n_steps, endpoint=False))`` (38 steps: 999, 972, 946, ..., 52, 26), as sigmas
  ``sqrt((1 - abar) / abar)`` in descending order with a zero appended. No diffusers ``timestep_spacing`` gives this
  grid, so the sigmas are built here and passed explicitly. The table is built in float64 and rounded to float32
  once, as sgm does.
* **Denoiser** (sgm ``DiscreteDenoiser`` with ``EpsScaling``): the sigma is snapped to the nearest of the 1000 table
  sigmas; the network sees ``x / sqrt(sigma^2 + 1)`` and the integer DDPM index, predicts the noise ``eps``, and the
  denoised estimate is ``x - sigma * eps``.
* **Guidance** (``VanillaCFG``): one batch, unconditional half first; ``D_u + scale * (D_c - D_u)``.
* **Steps** (``EulerEDMSampler`` with ``s_churn = 0``): ``x += (sigma_next - sigma) * (x - D) / sigma``. The caller
  hands in the start latent already at the first sigma's scale (sgm's ``prepare_sampling_loop`` multiplies by
  ``sqrt(1 + sigma_0^2)`` whatever the caller divided by; the two cancel, see :mod:`rtdecode.generate.unclip`).

The sampler state stays in float32 whatever precision the network runs in (sgm runs the UNet under fp16 autocast and
keeps ``x`` in float32).
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

N_TRAIN_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def ddpm_alphas_cumprod() -> np.ndarray:
    """The 1000 cumulative alpha products of the legacy DDPM schedule, float64."""
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, N_TRAIN_STEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def table_sigmas() -> Tensor:
    """Sigma of every DDPM index 0..999, ascending, float32 (the denoiser's lookup table)."""
    alphas_cumprod = ddpm_alphas_cumprod()
    return torch.tensor((1.0 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5


def step_indices(n_steps: int) -> np.ndarray:
    """The DDPM indices a run of ``n_steps`` visits, ascending (38 steps: 26, 52, ..., 972, 999)."""
    if not 1 <= n_steps <= N_TRAIN_STEPS:
        raise ValueError(f"n_steps must be in 1..{N_TRAIN_STEPS}, got {n_steps}")
    if n_steps == N_TRAIN_STEPS:
        return np.arange(N_TRAIN_STEPS)
    return np.linspace(N_TRAIN_STEPS - 1, 0, n_steps, endpoint=False).astype(int)[::-1].copy()


def sampling_sigmas(n_steps: int) -> Tensor:
    """The ``n_steps + 1`` sigmas of a run: descending, float32, a zero appended."""
    alphas_cumprod = ddpm_alphas_cumprod()[step_indices(n_steps)]
    sigmas = torch.tensor((1.0 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5
    return torch.cat([sigmas.flip(0), sigmas.new_zeros(1)])


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a UNet call is conditioned on: cross-attention tokens and SDXL's added conditions."""

    context: Tensor  # (B, n_tokens, width)
    added: dict[str, Tensor]  # diffusers ``added_cond_kwargs``: "text_embeds", "time_ids"

    @staticmethod
    def pair(uncond: "Conditioning", cond: "Conditioning") -> "Conditioning":
        """One batch for guidance: the unconditional half first, as sgm's VanillaCFG stacks it."""
        added = {key: torch.cat([uncond.added[key], cond.added[key]]) for key in cond.added}
        return Conditioning(torch.cat([uncond.context, cond.context]), added)


# (scaled latent, integer DDPM indices, conditioning) -> predicted noise
NoiseNet = Callable[[Tensor, Tensor, Conditioning], Tensor]


def unet_noise_net(unet: torch.nn.Module) -> NoiseNet:
    """A diffusers ``UNet2DConditionModel`` as a :data:`NoiseNet`."""

    def predict_noise(x: Tensor, index: Tensor, cond: Conditioning) -> Tensor:
        return unet(x, index, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added).sample

    return predict_noise


class EpsDenoiser:
    """sgm's discrete eps-prediction denoiser around a network that predicts noise.

    ``net`` is called with the latent already scaled by ``c_in`` and cast to ``net_dtype``; its output is taken
    back to float32.
    """

    def __init__(self, net: NoiseNet, net_dtype: torch.dtype = torch.float32) -> None:
        self.net = net
        self.net_dtype = net_dtype
        self._table: Tensor | None = None

    def table(self, device: torch.device) -> Tensor:
        """The 1000 table sigmas on ``device`` (built once per device)."""
        if self._table is None or self._table.device != device:
            self._table = table_sigmas().to(device)
        return self._table

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Denoised estimate of ``x`` (B, C, H, W) at noise level ``sigma`` (B,)."""
        table = self.table(x.device)
        index = (sigma[None, :] - table[:, None]).abs().argmin(dim=0)
        snapped = table[index].view(-1, 1, 1, 1)
        scaled = (x / torch.sqrt(snapped**2 + 1.0)).to(self.net_dtype)
        eps = self.net(scaled, index, cond).float()
        return x - snapped * eps


def guided(denoiser: EpsDenoiser, x: Tensor, sigma: Tensor, cond: Conditioning, paired: Conditioning | None,
           scale: float) -> Tensor:  # fmt: skip
    """The denoised estimate with classifier-free guidance; ``paired`` is :meth:`Conditioning.pair` of the
    unconditional and conditional halves, or None for no guidance."""
    if paired is None:
        return denoiser(x, sigma, cond)
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), paired)
    denoised_u, denoised_c = both.chunk(2)
    return denoised_u + scale * (denoised_c - denoised_u)


def euler_sample(
    denoiser: EpsDenoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float,
) -> Tensor:
    """Integrate ``x`` (float32, at ``sigmas[0]``'s scale) down the ``sigmas`` (descending, ending at 0)."""
    x = x.float()
    sigmas = sigmas.to(x.device)
    batch_ones = x.new_ones(x.shape[0])
    paired = None if uncond is None or scale == 1.0 else Conditioning.pair(uncond, cond)  # built once per run
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        denoised = guided(denoiser, x, batch_ones * sigma, cond, paired, scale)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x
