"""MindEye2's diffusion prior (spec §1.4): brain tokens -> CLIP ViT-bigG image tokens, predicting x0.

:class:`PriorNetwork` is MindEye2's ``PriorNetwork`` in ``learned_query_mode="pos_emb"`` with continuous time:
the transformer sees ``[brain tokens (n), time embedding (1), noisy image tokens + learned_query (n)]`` and its
last ``n`` outputs are the x0 prediction. :class:`DiffusionPrior` holds it as ``net`` next to the cosine
``noise_scheduler`` and reproduces ``BrainDiffusionPrior.p_sample_loop``:

* ``n_steps == timesteps``: DDPM ancestral sampling, one network evaluation per step;
* ``n_steps < timesteps``: dalle2's DDIM with eta = 1 on the public grid (:func:`ddim_timesteps`; 20 steps ->
  19 network evaluations, the last returns x0).

Random draws come from ``generator`` in the order the public code draws from the global RNG, so
``torch.manual_seed(s)`` before the public sampler equals passing a generator seeded ``s`` here. MindEye2 never
applies dalle2's ``image_embed_scale`` (spec §1.4): targets and samples are raw bigG tokens.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtdecode.errors import ModelError
from rtdecode.models.config import PriorConfig
from rtdecode.models.schedule import NoiseSchedule
from rtdecode.models.transformer import PriorTransformer

DDIM_ETA = 1.0  # dalle2's default; MindEye2 samples with it (fully stochastic DDIM)
SINUSOID_MAX_PERIOD = 10000
TIME_MLP_EXPANSION = 2  # dalle2 MLP: hidden width = 2 x output width, two hidden layers


# a replacement for one conditional network evaluation: (image tokens, float timesteps (B,), brain tokens) -> x0
StepNet = Callable[[Tensor, Tensor, Tensor], Tensor]
X0Predictor = Callable[[Tensor, Tensor], Tensor]  # (state, integer timesteps) -> x0


def ddim_timesteps(n_steps: int, timesteps: int) -> list[int]:
    """The public DDIM grid, descending: ``linspace(-1, T, n + 1)[:-1]`` in float32, truncated to int, reversed.

    For ``n_steps=20, timesteps=100`` this is ``[94, 89, ..., 9, 4, -1]``: consecutive pairs are the
    ``(t, t_next)`` steps, so there are ``n_steps - 1`` network evaluations and ``-1`` means "return x0".
    """
    if not 2 <= n_steps < timesteps:
        raise ModelError(f"DDIM n_steps must be in 2..{timesteps - 1} (timesteps={timesteps}), got {n_steps}")
    grid = torch.linspace(-1.0, float(timesteps), steps=n_steps + 1, dtype=torch.float32, device="cpu")[:-1]
    return list(reversed(grid.int().tolist()))


class SinusoidalTimeEmbedding(nn.Module):
    """dalle2 SinusoidalPosEmb: ``[sin(t f), cos(t f)]`` with ``dim // 2`` geometric frequencies, in t's dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4:
            raise ModelError(f"prior.dim must be >= 4 for the sinusoidal time embedding, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half_dim = self.dim // 2
        step = math.log(SINUSOID_MAX_PERIOD) / (half_dim - 1)
        freqs = torch.exp(torch.arange(half_dim, device=t.device, dtype=t.dtype) * -step)
        angles = t[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1).to(t.dtype)


class TimeMLP(nn.Module):
    """dalle2 MLP(dim, dim): Linear -> SiLU -> Linear -> SiLU -> Linear, widths dim -> 2 dim -> 2 dim -> dim.

    The public MLP casts its input to float32 (spec §1.4); here it is then cast to the weights' dtype, which is a
    no-op for float32 weights (also under autocast) and lets a model converted to fp16/bf16 run without autocast.
    Keys: ``net.0.0``, ``net.1.0``, ``net.2`` (the empty ``.2`` slots are dalle2's norm-off Identities).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden_dim = TIME_MLP_EXPANSION * dim
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Identity()),
            nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Identity()),
            nn.Linear(hidden_dim, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float().to(self.net[2].weight.dtype))


class TokenAxis(nn.Module):
    """(B, dim) -> (B, 1, dim): dalle2's ``Rearrange('b (n d) -> b n d', n=1)`` for one time token."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def _keep_mask(batch: int, drop_prob: float, device: torch.device, generator: torch.Generator | None) -> Tensor | None:
    """Per-sample keep mask (B, 1, 1) for condition dropout; ``None`` when nothing can be dropped.

    As dalle2's ``prob_mask_like``: probability 0 and 1 draw nothing from the RNG; otherwise one uniform per
    sample is drawn and kept where it is below ``1 - drop_prob``.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ModelError(f"prior condition drop probability must be in [0, 1], got {drop_prob}")
    keep_prob = 1 - drop_prob
    if keep_prob == 1:
        return None
    if keep_prob == 0:
        return torch.zeros(batch, 1, 1, dtype=torch.bool, device=device)
    uniform = torch.zeros(batch, device=device).uniform_(0, 1, generator=generator)
    return (uniform < keep_prob)[:, None, None]


def _drop(tokens: Tensor, null_tokens: Tensor, keep: Tensor | None) -> Tensor:
    """Replace the dropped samples' tokens by the learned null tokens (cast to the tokens' dtype)."""
    if keep is None:
        return tokens
    return torch.where(keep, tokens, null_tokens.to(tokens.dtype)[None])


class PriorNetwork(nn.Module):
    """x0-predicting transformer over [brain tokens, time token, noisy image tokens + learned_query].

    Keys (spec §2.1): ``learned_query``, ``null_brain_embeds``, ``null_image_embed`` (n_tokens x dim),
    ``to_time_embeds.0.1.net.*`` and ``causal_transformer.*``.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        dim, n_tokens = config.dim, config.n_tokens
        self.to_time_embeds = nn.Sequential(nn.Sequential(SinusoidalTimeEmbedding(dim), TimeMLP(dim)), TokenAxis())
        self.learned_query = nn.Parameter(torch.randn(n_tokens, dim) * dim**-0.5)
        self.causal_transformer = PriorTransformer(config)
        self.null_brain_embeds = nn.Parameter(torch.randn(n_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.randn(n_tokens, dim))

    def forward(
        self,
        image_tokens: Tensor,
        timesteps: Tensor,
        brain_tokens: Tensor,
        *,
        brain_cond_drop_prob: float = 0.0,
        image_cond_drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x0 prediction (B, n_tokens, dim) from noisy ``image_tokens`` at diffusion step ``timesteps`` (B,).

        The drop probabilities replace whole samples' brain / image tokens by the null embeddings (classifier-free
        guidance training); the masks are drawn from ``generator``, brain first, as the public code does.
        """
        self._check_inputs(image_tokens, timesteps, brain_tokens)
        batch, device = image_tokens.shape[0], image_tokens.device
        brain_keep = _keep_mask(batch, brain_cond_drop_prob, device, generator)
        image_keep = _keep_mask(batch, image_cond_drop_prob, device, generator)
        brain_tokens = _drop(brain_tokens, self.null_brain_embeds, brain_keep)
        image_tokens = _drop(image_tokens, self.null_image_embed, image_keep)
        # float32 sinusoids (the public fp32 inputs under autocast); the MLP casts to its weights' dtype
        time_tokens = self.to_time_embeds(timesteps.float())
        image_tokens = image_tokens + self.learned_query  # "pos_emb" mode: a position embedding, no extra queries
        tokens = self.causal_transformer(torch.cat((brain_tokens, time_tokens, image_tokens), dim=-2))
        return tokens[:, -self.config.n_tokens :, :]

    def forward_with_cond_scale(
        self, image_tokens: Tensor, timesteps: Tensor, brain_tokens: Tensor, *, cond_scale: float = 1.0
    ) -> Tensor:
        """Classifier-free guidance: ``null + (cond - null) * cond_scale``; scale 1 is the conditional prediction.

        The null prediction drops both conditions (null brain *and* null image tokens), as the public code does.
        """
        cond = self(image_tokens, timesteps, brain_tokens)
        if cond_scale == 1:
            return cond
        null = self(image_tokens, timesteps, brain_tokens, brain_cond_drop_prob=1.0, image_cond_drop_prob=1.0)
        return null + (cond - null) * cond_scale

    def _check_inputs(self, image_tokens: Tensor, timesteps: Tensor, brain_tokens: Tensor) -> None:
        expected = (self.config.n_tokens, self.config.dim)
        for name, tokens in (("image_tokens", image_tokens), ("brain_tokens", brain_tokens)):
            if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
                shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
                raise ModelError(f"prior: {name} must have shape (B, {expected[0]}, {expected[1]}), got {shape}")
        if brain_tokens.shape[0] != image_tokens.shape[0]:
            raise ModelError(
                f"prior: brain_tokens batch {brain_tokens.shape[0]} != image_tokens batch {image_tokens.shape[0]}"
            )
        if not isinstance(timesteps, Tensor) or tuple(timesteps.shape) != (image_tokens.shape[0],):
            shape = tuple(timesteps.shape) if isinstance(timesteps, Tensor) else type(timesteps).__name__
            raise ModelError(f"prior: timesteps must have shape ({image_tokens.shape[0]},), got {shape}")


class DiffusionPrior(nn.Module):
    """The ``diffusion_prior`` of a MindEye2 model: ``noise_scheduler`` (cosine, persistent buffers) and ``net``."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        self.noise_scheduler = NoiseSchedule(config.timesteps)
        self.net = PriorNetwork(config)

    @torch.no_grad()
    def sample(
        self,
        brain_tokens: Tensor,
        *,
        n_steps: int = 20,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        net: StepNet | None = None,
    ) -> Tensor:
        """Image tokens (B, n_tokens, dim) for brain (backbone) tokens, as ``BrainDiffusionPrior.p_sample_loop``.

        ``n_steps == timesteps`` runs DDPM, fewer runs DDIM (eta 1) on :func:`ddim_timesteps`. Noise, the sampler
        state and the update arithmetic are float32 (the public code's, whose fp32 model runs under autocast);
        only the network runs in its parameters' dtype, so an fp16/bf16 model loses no precision in the updates.
        Returns float32.

        ``net`` replaces the network's conditional evaluation (a compiled engine of it: image tokens, float
        timesteps, brain tokens -> x0); it serves guidance scale 1 only, MindEye2's setting.
        """
        self._check_sampling(brain_tokens, n_steps, guidance_scale)
        if net is not None and guidance_scale != 1.0:
            raise ModelError(f"prior: a replacement network serves guidance_scale 1 only, got {guidance_scale}")
        brain_tokens = brain_tokens.to(self.net.learned_query.dtype)
        x = self._randn(brain_tokens.shape, brain_tokens.device, torch.float32, generator)
        predict = self._x0_predictor(brain_tokens, guidance_scale, net)
        if n_steps == self.noise_scheduler.num_timesteps:
            for t in reversed(range(n_steps)):
                x = self._ddpm_step(x, t, predict, generator)
            return x.float()
        grid = ddim_timesteps(n_steps, self.noise_scheduler.num_timesteps)
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            x = self._ddim_step(x, t, t_next, predict, generator)
        return x.float()  # the last step returns x0 in the network's dtype

    def loss(self, image_tokens: Tensor, brain_tokens: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Training loss: MSE between the x0 prediction and ``image_tokens`` at a uniform step t in [0, T).

        Draw order as the public ``forward``/``p_losses``: t, the noise, then the brain and image drop masks
        (probability ``config.cond_drop_prob`` each, per sample). The target is not scaled (spec §1.4).
        """
        batch, device = image_tokens.shape[0], image_tokens.device
        times = torch.randint(
            0, self.noise_scheduler.num_timesteps, (batch,), device=device, dtype=torch.long, generator=generator
        )
        noise = torch.randn(image_tokens.shape, device=device, dtype=image_tokens.dtype, generator=generator)
        noisy = self.noise_scheduler.q_sample(image_tokens, times, noise)
        drop_prob = self.config.cond_drop_prob
        net_dtype = self.net.learned_query.dtype  # a model converted to fp16/bf16 (DeepSpeed) keeps fp32 buffers
        pred = self.net(
            noisy.to(net_dtype),
            times,
            brain_tokens.to(net_dtype),
            brain_cond_drop_prob=drop_prob,
            image_cond_drop_prob=drop_prob,
            generator=generator,
        )
        return F.mse_loss(pred.float(), image_tokens.float())

    def _ddpm_step(self, x: Tensor, t: int, predict: X0Predictor, generator: torch.Generator | None) -> Tensor:
        """One ancestral step: posterior mean at the predicted x0, plus noise except at t = 0 (drawn regardless)."""
        times = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = predict(x, times)
        mean, _, log_variance = self.noise_scheduler.q_posterior(x0, x, times)
        noise = self._randn(x.shape, x.device, x.dtype, generator)
        nonzero = (1 - (times == 0).to(x.dtype)).reshape(-1, *((1,) * (x.ndim - 1)))
        return mean + nonzero * (0.5 * log_variance).exp() * noise

    def _ddim_step(
        self,
        x: Tensor,
        t: int,
        t_next: int,
        predict: X0Predictor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """dalle2 DDIM step ``t -> t_next`` with alphas from ``alphas_cumprod_prev`` (its indexing, kept as is)."""
        times = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = predict(x, times)
        if t_next < 0:
            return x0
        pred_noise = self.noise_scheduler.predict_noise_from_start(x, times, x0)
        alphas = self.noise_scheduler.alphas_cumprod_prev
        alpha, alpha_next = alphas[t].float(), alphas[t_next].float()
        c1 = DDIM_ETA * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        c2 = ((1 - alpha_next) - torch.square(c1)).sqrt()
        noise = self._randn(x.shape, x.device, x.dtype, generator) if t_next > 0 else 0.0
        return x0 * alpha_next.sqrt() + c1 * noise + c2 * pred_noise

    def _x0_predictor(self, brain_tokens: Tensor, guidance_scale: float, net: StepNet | None) -> X0Predictor:
        """``(x, times) -> x0`` for the float32 state ``x``, in the network's output dtype.

        Not upcast: the public update multiplies the (autocast fp16) x0 by a 0-dim coefficient, which rounds in
        fp16 before the float32 noise terms are added; doing the same keeps the autocast path bit-faithful.
        A replacement ``net`` gets float32 inputs and float timesteps and returns float32.
        """
        if net is not None:
            return lambda x, times: net(x, times.float(), brain_tokens)

        def predict(x: Tensor, times: Tensor) -> Tensor:
            return self.net.forward_with_cond_scale(
                x.to(brain_tokens.dtype), times, brain_tokens, cond_scale=guidance_scale
            )

        return predict

    @staticmethod
    def _randn(
        shape: torch.Size, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Tensor:
        """Standard normal noise drawn in float32 (as the public sampler draws it), then cast to ``dtype``."""
        return torch.randn(shape, device=device, dtype=torch.float32, generator=generator).to(dtype)

    def _check_sampling(self, brain_tokens: Tensor, n_steps: int, guidance_scale: float) -> None:
        expected = (self.config.n_tokens, self.config.dim)
        if not isinstance(brain_tokens, Tensor) or brain_tokens.ndim != 3 or tuple(brain_tokens.shape[1:]) != expected:
            shape = tuple(brain_tokens.shape) if isinstance(brain_tokens, Tensor) else type(brain_tokens).__name__
            raise ModelError(f"prior: brain_tokens must have shape (B, {expected[0]}, {expected[1]}), got {shape}")
        n_timesteps = self.noise_scheduler.num_timesteps
        if not isinstance(n_steps, int) or not 2 <= n_steps <= n_timesteps:
            raise ModelError(
                f"prior n_steps must be an integer in 2..{n_timesteps} ({n_timesteps} = DDPM, fewer = DDIM; the "
                f"public grid gives 1 step no network evaluation), got {n_steps!r}"
            )
        if guidance_scale != 1 and self.config.cond_drop_prob <= 0:
            raise ModelError(
                f"prior guidance_scale {guidance_scale} needs a model trained with condition dropout "
                f"(prior.cond_drop_prob > 0), got cond_drop_prob={self.config.cond_drop_prob}"
            )
