"""The diffusion prior's noise schedule (spec §1.4): Nichol's cosine schedule as dalle2-pytorch 1.15.6 registers it.

The 13 tables are computed in float64, stored as float32 buffers of shape ``(timesteps,)`` and are *persistent*:
the published checkpoints carry them under ``diffusion_prior.noise_scheduler.*`` (spec §2.1), so they must stay in
the state_dict even though they are a pure function of ``timesteps``. No value here is ever hand-tuned; MindEye2 uses
the dalle2 defaults (cosine, ``s = 0.008``, betas clipped to 0.999, no p2 loss reweighting).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from rtdecode.errors import ModelError
from rtdecode.models.precision import Float32Tables

COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_0 from vanishing
MAX_BETA = 0.999  # betas are clipped here (the last cosine beta would otherwise be ~1)
MIN_POSTERIOR_VARIANCE = 1e-20  # posterior variance is 0 at t = 0; its log is taken of the clamped value
P2_LOSS_WEIGHT_GAMMA = 0.0  # dalle2 default: p2 reweighting off, so p2_loss_weight is all ones
P2_LOSS_WEIGHT_K = 1.0


def cosine_betas(timesteps: int) -> Tensor:
    """float64 betas of the cosine schedule: ``1 - abar(t+1)/abar(t)`` with ``abar`` the squared cosine, clipped."""
    steps = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((steps / timesteps) + COSINE_OFFSET) / (1 + COSINE_OFFSET) * torch.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, MAX_BETA)


def schedule_tables(timesteps: int) -> dict[str, Tensor]:
    """The 13 float64 tables, keyed as the public NoiseScheduler names its buffers (in its registration order)."""
    betas = cosine_betas(timesteps)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=MIN_POSTERIOR_VARIANCE)),
        "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        "p2_loss_weight": (P2_LOSS_WEIGHT_K + alphas_cumprod / (1 - alphas_cumprod)) ** -P2_LOSS_WEIGHT_GAMMA,
    }


def _at(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """``table[t]`` per sample, shaped ``(B, 1, ..., 1)`` to broadcast against a tensor of ``ndim`` dims."""
    return table.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


class NoiseSchedule(Float32Tables):
    """Cosine schedule buffers plus the three formulas training and sampling need (predict-x0 parameterisation).

    The buffers stay float32 when the model is cast to fp16/bf16 (:class:`Float32Tables`): in bf16 the DDIM
    coefficients would move by up to ~30%.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(self, timesteps: int) -> None:
        super().__init__()
        if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1:
            raise ModelError(f"prior.timesteps must be a positive integer, got {timesteps!r}")
        self.num_timesteps = timesteps
        for name, table in schedule_tables(timesteps).items():
            self.register_buffer(name, table.to(torch.float32), persistent=True)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Noised sample at step ``t``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        return (
            _at(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def predict_noise_from_start(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise implied by ``x_t`` and a predicted ``x0`` (DDIM's epsilon)."""
        return (_at(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / _at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x0)`` (the DDPM ancestral step)."""
        mean = _at(self.posterior_mean_coef1, t, x_t.ndim) * x0 + _at(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        variance = _at(self.posterior_variance, t, x_t.ndim)
        log_variance = _at(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, variance, log_variance
