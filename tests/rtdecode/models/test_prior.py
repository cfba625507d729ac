"""The diffusion prior (spec §1.4): published layout, schedule, attention quirks, sampling, and an oracle fixture.

The oracle (``data/prior_oracle.safetensors``, written by ``oracles/make_prior_oracle.py`` from dalle2-pytorch
1.15.6 + rotary-embedding-torch 0.9.1) holds weights in the published key layout, inputs, seeds and the public
code's outputs: forward, guided forward, 20-step DDIM, guided 7-step DDIM, 100-step DDPM, the training loss, a
bf16-autocast forward, an fp16-autocast DDIM and the rel-pos bucket of every offset in -600..600.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from rtdecode.errors import ModelError
from rtdecode.models.config import PriorConfig, tiny
from rtdecode.models.prior import DiffusionPrior, ddim_timesteps
from rtdecode.models.schedule import NoiseSchedule
from rtdecode.models.transformer import (
    Attention,
    GainLayerNorm,
    RotaryEmbedding,
    attention_weights,
    relative_position_bucket,
)

FIXTURE = Path(__file__).parent / "data" / "prior_oracle.safetensors"
PREFIX = "diffusion_prior."
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "p2_loss_weight",
)


def _spec_state_shapes() -> dict[str, tuple[int, ...]]:
    """The prior's keys and shapes as spec §2.1 lists them for the published models (not read from our module)."""
    expected = {f"{PREFIX}noise_scheduler.{name}": (100,) for name in SCHEDULE_BUFFERS}
    net = f"{PREFIX}net."
    expected |= {f"{net}{name}": (256, 1664) for name in ("learned_query", "null_brain_embeds", "null_image_embed")}
    time = f"{net}to_time_embeds.0.1.net."
    expected |= {
        f"{time}0.0.weight": (3328, 1664),
        f"{time}0.0.bias": (3328,),
        f"{time}1.0.weight": (3328, 3328),
        f"{time}1.0.bias": (3328,),
        f"{time}2.weight": (1664, 3328),
        f"{time}2.bias": (1664,),
    }
    transformer = f"{net}causal_transformer."
    expected[f"{transformer}rel_pos_bias.relative_attention_bias.weight"] = (32, 32)
    for layer in range(6):
        attn, ff = f"{transformer}layers.{layer}.0.", f"{transformer}layers.{layer}.1."
        expected |= {
            f"{attn}null_kv": (2, 52),
            f"{attn}norm.g": (1664,),
            f"{attn}to_q.weight": (1664, 1664),
            f"{attn}to_kv.weight": (104, 1664),
            f"{attn}rotary_emb.freqs": (16,),
            f"{attn}to_out.0.weight": (1664, 1664),
            f"{attn}to_out.1.g": (1664,),
            f"{ff}0.g": (1664,),
            f"{ff}1.weight": (13312, 1664),
            f"{ff}5.weight": (1664, 6656),
        }
    expected |= {f"{transformer}norm.g": (1664,), f"{transformer}project_out.weight": (1664, 1664)}
    return expected


@pytest.fixture(scope="module")
def real_prior() -> DiffusionPrior:
    with torch.device("meta"):
        return DiffusionPrior(PriorConfig())


@pytest.fixture
def config() -> PriorConfig:
    return tiny().prior


@pytest.fixture
def prior(config: PriorConfig) -> DiffusionPrior:
    torch.manual_seed(0)
    return DiffusionPrior(config).eval()


def _tokens(config: PriorConfig, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, config.n_tokens, config.dim, generator=torch.Generator().manual_seed(seed))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- published layout (spec §1.3, §2.1) ---------------------------------------------------------------------------


def test_real_size_has_the_published_parameter_count(real_prior: DiffusionPrior) -> None:
    parameters = list(real_prior.parameters())
    assert sum(p.numel() for p in parameters) == 259_865_216
    assert sum(p.numel() for p in parameters if not p.requires_grad) == 16


def test_real_size_state_dict_is_the_published_layout(real_prior: DiffusionPrior) -> None:
    actual = {PREFIX + key: tuple(value.shape) for key, value in real_prior.state_dict().items()}
    expected = _spec_state_shapes()
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert actual == expected


def test_one_rotary_module_is_shared_by_every_layer(real_prior: DiffusionPrior) -> None:
    rotaries = {id(attn.rotary_emb) for attn, _ in real_prior.net.causal_transformer.layers}
    assert len(rotaries) == 1
    assert not real_prior.net.causal_transformer.layers[0][0].rotary_emb.freqs.requires_grad


# --- noise schedule -------------------------------------------------------------------------------------------------


def _numpy_cosine_schedule(timesteps: int) -> dict[str, np.ndarray]:
    """Nichol & Dhariwal's cosine schedule (s = 0.008, betas clipped at 0.999) and the DDPM posterior, in float64."""
    steps = np.arange(timesteps + 1, dtype=np.float64)
    f = np.cos((steps / timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = f / f[0]
    betas = np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    acp = np.cumprod(1 - betas)
    prev = np.concatenate([[1.0], acp[:-1]])
    variance = betas * (1 - prev) / (1 - acp)
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - acp),
        "log_one_minus_alphas_cumprod": np.log(1 - acp),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / acp - 1),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - acp),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - acp),
        "p2_loss_weight": np.ones(timesteps),
    }


@pytest.mark.parametrize("timesteps", [100, 37])
def test_schedule_buffers_follow_the_cosine_formula(timesteps: int) -> None:
    schedule = NoiseSchedule(timesteps)
    state = schedule.state_dict()
    assert list(state) == list(SCHEDULE_BUFFERS)  # all persistent, in the public registration order
    expected = _numpy_cosine_schedule(timesteps)
    for name in SCHEDULE_BUFFERS:
        assert state[name].dtype == torch.float32 and state[name].shape == (timesteps,), name
        np.testing.assert_allclose(state[name].numpy(), expected[name], rtol=2e-6, atol=1e-7, err_msg=name)
    assert schedule.betas[-1].item() == pytest.approx(0.999)  # the last cosine beta (~1) is clipped
    assert schedule.num_timesteps == timesteps


def test_schedule_formulas_invert_each_other() -> None:
    schedule = NoiseSchedule(100)
    x0, noise = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    t = torch.tensor([0, 17, 50, 99])
    x_t = schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(schedule.predict_noise_from_start(x_t, t, x0), noise, rtol=1e-4, atol=1e-4)
    mean, variance, log_variance = schedule.q_posterior(x0, x_t, t)
    acp, prev, betas = (schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t], schedule.betas[t])
    textbook = (prev.sqrt() * betas / (1 - acp))[:, None, None] * x0 + ((1 - betas).sqrt() * (1 - prev) / (1 - acp))[
        :, None, None
    ] * x_t
    torch.testing.assert_close(mean, textbook, rtol=1e-4, atol=1e-4)  # float32 cancellation in 1 - abar near t = 0
    assert variance[0].item() == 0.0 and log_variance[0].item() == pytest.approx(math.log(1e-20))


def test_schedule_rejects_a_bad_length() -> None:
    with pytest.raises(ModelError, match="timesteps"):
        NoiseSchedule(0)


# --- transformer quirks ---------------------------------------------------------------------------------------------


def _python_bucket(offset: int, n_buckets: int = 32, max_distance: int = 128) -> int:
    distance = max(-offset, 0)
    exact = n_buckets // 2
    if distance < exact:
        return distance
    return min(n_buckets - 1, exact + int(math.log(distance / exact) / math.log(max_distance / exact) * exact))


def test_rel_pos_bias_is_computed_on_an_n_by_n_plus_one_grid(prior: DiffusionPrior, config: PriorConfig) -> None:
    n_tokens = 2 * config.n_tokens + 1
    rel_pos = prior.net.causal_transformer.rel_pos_bias
    bias = rel_pos(n_tokens, n_tokens + 1, device=torch.device("cpu"))
    assert bias.shape == (config.heads, n_tokens, n_tokens + 1)
    weight = rel_pos.relative_attention_bias.weight
    for query, key in [(0, 0), (0, 1), (5, 0), (12, 13), (12, 3), (7, 7)]:
        torch.testing.assert_close(bias[:, query, key], weight[_python_bucket(key - query)])


def test_rel_pos_buckets_match_the_t5_function() -> None:
    offsets = torch.arange(-600, 601)
    buckets = relative_position_bucket(offsets, 32, 128)
    assert buckets.tolist() == [_python_bucket(offset) for offset in offsets.tolist()]
    assert buckets[offsets > 0].eq(0).all()  # keys after the query all share bucket 0 (non-causal quirk)


def test_attention_softmax_runs_in_float32_under_bf16(config: PriorConfig) -> None:
    torch.manual_seed(0)
    attention = Attention(config.dim, config.dim_head, config.heads, RotaryEmbedding(config.rotary_dim))
    attention = attention.to(torch.bfloat16)
    x = torch.randn(2, 9, config.dim, dtype=torch.bfloat16)
    bias = torch.randn(config.heads, 9, 10, dtype=torch.bfloat16)
    with _SoftmaxDtypes() as seen:
        out = attention(x, bias)
    assert seen.dtypes == [(torch.bfloat16, torch.float32)]  # (input, result) of the one softmax
    assert out.dtype == torch.bfloat16
    sim = torch.randn(3, 7, dtype=torch.bfloat16) * 30
    assert torch.equal(attention_weights(sim), sim.float().softmax(-1).to(torch.bfloat16))


class _SoftmaxDtypes(TorchFunctionMode):
    """Records (input dtype, result dtype) of every softmax call."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        result = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax":
            self.dtypes.append((args[0].dtype, result.dtype))
        return result


def test_layer_norm_eps_depends_on_dtype() -> None:
    norm = GainLayerNorm(4)
    x = torch.tensor([[0.0, 0.01, 0.02, 0.03]])
    var = x.var(dim=-1, correction=0, keepdim=True)
    for dtype, eps in [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-3)]:
        expected = ((x - x.mean(-1, keepdim=True)) / (var + eps).sqrt()).to(dtype)
        torch.testing.assert_close(norm.to(dtype)(x.to(dtype)), expected, rtol=2e-2, atol=2e-2)
    assert norm.float()(x)[0, -1].item() > 1.2  # var 1.25e-4: eps 1e-5 gives 1.29, eps 1e-3 gives 0.45
    assert norm.half()(x.half())[0, -1].item() < 0.5


def test_stable_layer_norm_divides_by_the_row_max_first() -> None:
    plain, stable = GainLayerNorm(5), GainLayerNorm(5, stable=True)
    x = torch.randn(3, 5) * 1e-3
    x[0] = x[0].abs()  # positive max: same as the plain norm of x / max
    x[1] = -x[1].abs()  # negative max: the sign flips
    expected = plain(x / x.amax(-1, keepdim=True))
    torch.testing.assert_close(stable(x), expected)
    assert (stable(x)[1] * plain(x)[1]).sum() < 0


# --- network, guidance, sampling ------------------------------------------------------------------------------------


def test_guidance_scale_one_is_the_conditional_prediction(prior: DiffusionPrior, config: PriorConfig) -> None:
    x, brain = _tokens(config, 3, 1), _tokens(config, 3, 2)
    t = torch.tensor([5, 50, 99])
    with torch.no_grad():
        cond = prior.net(x, t, brain)
        assert torch.equal(prior.net.forward_with_cond_scale(x, t, brain, cond_scale=1.0), cond)
        null = prior.net(x, t, brain, brain_cond_drop_prob=1.0, image_cond_drop_prob=1.0)
        guided = prior.net.forward_with_cond_scale(x, t, brain, cond_scale=3.0)
    torch.testing.assert_close(guided, null + (cond - null) * 3.0)
    assert not torch.allclose(guided, cond)


def test_dropping_both_conditions_equals_feeding_the_null_embeddings(
    prior: DiffusionPrior, config: PriorConfig
) -> None:
    x, brain = _tokens(config, 2, 1), _tokens(config, 2, 2)
    t = torch.tensor([3.0, 60.0])
    net = prior.net
    with torch.no_grad():
        dropped = net(x, t, brain, brain_cond_drop_prob=1.0, image_cond_drop_prob=1.0)
        fed = net(net.null_image_embed.expand(2, -1, -1), t, net.null_brain_embeds.expand(2, -1, -1))
        brain_only = net(x, t, brain, brain_cond_drop_prob=1.0)
    assert torch.equal(dropped, fed)
    assert not torch.allclose(brain_only, dropped)


def test_condition_dropout_is_per_sample(prior: DiffusionPrior, config: PriorConfig) -> None:
    batch, net = 8, prior.net
    x, brain = _tokens(config, batch, 1), _tokens(config, batch, 2)
    t = torch.arange(batch) * 11
    replay = _seeded(5)  # masks are drawn brain first, one uniform per sample, kept where < 1 - p
    brain_keep = torch.zeros(batch).uniform_(0, 1, generator=replay) < 0.5
    image_keep = torch.zeros(batch).uniform_(0, 1, generator=replay) < 0.5
    assert 0 < brain_keep.sum() < batch and 0 < image_keep.sum() < batch
    with torch.no_grad():
        out = net(x, t, brain, brain_cond_drop_prob=0.5, image_cond_drop_prob=0.5, generator=_seeded(5))
        brain_in = torch.where(brain_keep[:, None, None], brain, net.null_brain_embeds)
        image_in = torch.where(image_keep[:, None, None], x, net.null_image_embed)
        expected = net(image_in, t, brain_in)
    torch.testing.assert_close(out, expected)


def test_ddim_grid_for_20_steps_is_the_public_one() -> None:
    assert ddim_timesteps(20, 100) == [94, 89, 84, 79, 74, 69, 64, 59, 54, 49, 44, 39, 34, 29, 24, 19, 14, 9, 4, -1]
    assert ddim_timesteps(7, 100) == [85, 71, 56, 42, 27, 13, -1]
    for n_steps in (1, 100):
        with pytest.raises(ModelError, match="n_steps"):
            ddim_timesteps(n_steps, 100)


@pytest.mark.parametrize(("n_steps", "guidance", "evaluations"), [(20, 1.0, 19), (20, 2.0, 38), (100, 1.0, 100)])
def test_network_evaluations_per_sample(
    prior: DiffusionPrior, config: PriorConfig, n_steps: int, guidance: float, evaluations: int
) -> None:
    calls = []
    handle = prior.net.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        prior.sample(_tokens(config, 2, 3), n_steps=n_steps, generator=_seeded(0), guidance_scale=guidance)
    finally:
        handle.remove()
    assert len(calls) == evaluations


@pytest.mark.parametrize("n_steps", [20, 100])
def test_sampling_is_deterministic_per_seed(prior: DiffusionPrior, config: PriorConfig, n_steps: int) -> None:
    brain = _tokens(config, 3, 4)
    first = prior.sample(brain, n_steps=n_steps, generator=_seeded(7))
    again = prior.sample(brain, n_steps=n_steps, generator=_seeded(7))
    other = prior.sample(brain, n_steps=n_steps, generator=_seeded(8))
    assert first.shape == (3, config.n_tokens, config.dim)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    torch.manual_seed(7)  # the public code draws from the global RNG: same stream as a generator seeded alike
    assert torch.equal(prior.sample(brain, n_steps=n_steps), first)


def test_sampling_rejects_bad_arguments(prior: DiffusionPrior, config: PriorConfig) -> None:
    brain = _tokens(config, 1, 0)
    with pytest.raises(ModelError, match="brain_tokens"):
        prior.sample(brain[:, :-1])
    for n_steps in (0, 1, 101):
        with pytest.raises(ModelError, match="n_steps"):
            prior.sample(brain, n_steps=n_steps)
    no_dropout = DiffusionPrior(dataclasses.replace(config, cond_drop_prob=0.0))
    with pytest.raises(ModelError, match="cond_drop_prob"):
        no_dropout.sample(brain, guidance_scale=2.0)
    with pytest.raises(ModelError, match="drop probability"):
        prior.net(brain, torch.zeros(1), brain, brain_cond_drop_prob=1.5)
    with pytest.raises(ModelError, match="timesteps"):
        prior.net(brain, torch.zeros(2), brain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_samples_on_cpu(prior: DiffusionPrior, config: PriorConfig, dtype: torch.dtype) -> None:
    brain = _tokens(config, 2, 5)
    x, t = _tokens(config, 2, 6), torch.tensor([10, 90])
    with torch.no_grad():
        reference = prior.net(x, t, brain)
    low = prior.to(dtype)
    with torch.no_grad():
        forward = low.net(x.to(dtype), t, brain.to(dtype))
    torch.testing.assert_close(forward.float(), reference, rtol=0.1, atol=0.1)
    for n_steps in (20, 100):
        sample = low.sample(brain, n_steps=n_steps, generator=_seeded(1))
        # the sampler state and its updates stay float32, whatever the network's dtype
        assert sample.dtype == torch.float32 and sample.shape == brain.shape and sample.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casting_the_model_keeps_the_schedule_and_rotary_tables_float32(config: PriorConfig, dtype) -> None:
    """In bf16 the DDIM coefficients would move by up to ~30% and rotary angles by radians (public: fp32 + autocast)."""
    fresh = DiffusionPrior(config)
    low = DiffusionPrior(config).to(dtype)
    assert low.net.learned_query.dtype == dtype
    for name, table in fresh.noise_scheduler.named_buffers():
        cast = getattr(low.noise_scheduler, name)
        assert cast.dtype == torch.float32, name
        torch.testing.assert_close(cast, table, rtol=0, atol=0)
    rotary = low.net.causal_transformer.layers[0][0].rotary_emb
    assert rotary.freqs.dtype == torch.float32 and not rotary.freqs.requires_grad
    torch.testing.assert_close(rotary.freqs, fresh.net.causal_transformer.layers[0][0].rotary_emb.freqs)
    assert all(layer[0].rotary_emb is rotary for layer in low.net.causal_transformer.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_of_a_converted_model_matches_fp32(config: PriorConfig, dtype: torch.dtype) -> None:
    """DeepSpeed converts the model (no autocast); its fp32 schedule buffers must not break the loss."""
    torch.manual_seed(0)
    prior = DiffusionPrior(config)
    image, brain = _tokens(config, 8, 1), _tokens(config, 8, 2)
    reference = prior.loss(image, brain, generator=_seeded(3))
    low = prior.to(dtype)
    loss = low.loss(image, brain.to(dtype), generator=_seeded(3))
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None for n, p in low.named_parameters() if not n.endswith("rotary_emb.freqs"))
    assert loss.item() == pytest.approx(reference.item(), rel=5e-2)


def test_loss_reaches_every_parameter_but_the_rotary_freqs(config: PriorConfig) -> None:
    torch.manual_seed(0)
    prior = DiffusionPrior(dataclasses.replace(config, cond_drop_prob=0.5))
    loss = prior.loss(_tokens(config, 8, 1), _tokens(config, 8, 2), generator=_seeded(3))
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    for name, parameter in prior.named_parameters():
        if name.endswith("rotary_emb.freqs"):
            assert parameter.grad is None
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sampling_on_cuda(prior: DiffusionPrior, config: PriorConfig, dtype: torch.dtype) -> None:
    model = prior.to("cuda", dtype)
    brain = _tokens(config, 3, 4).cuda()
    first = model.sample(brain, n_steps=20, generator=torch.Generator("cuda").manual_seed(1))
    again = model.sample(brain, n_steps=20, generator=torch.Generator("cuda").manual_seed(1))
    assert first.dtype == dtype and first.device.type == "cuda" and first.isfinite().all()
    assert torch.equal(first, again)
    with torch.autocast("cuda", dtype=torch.float16):
        autocast = prior.float().sample(brain.half(), n_steps=100, generator=torch.Generator("cuda").manual_seed(1))
    assert autocast.isfinite().all()


# --- oracle: the public dalle2 pieces (see oracles/make_prior_oracle.py) -------------------------------------------


@pytest.fixture(scope="module")
def oracle() -> dict:
    with safe_open(str(FIXTURE), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    config = PriorConfig(**json.loads(metadata["config"]))
    model = DiffusionPrior(config)
    state = {key[len(PREFIX) :]: value for key, value in tensors.items() if key.startswith(PREFIX)}
    return {
        "config": config,
        "fresh_state": {key: value.clone() for key, value in model.state_dict().items()},
        "model": model.eval(),
        "state": state,
        "tensors": tensors,
        "seeds": json.loads(metadata["seeds"]),
        "guidance": json.loads(metadata["guidance"]),
    }


@pytest.fixture(scope="module")
def oracle_model(oracle: dict) -> DiffusionPrior:
    oracle["model"].load_state_dict(oracle["state"], strict=True)
    return oracle["model"]


def test_oracle_fixture_is_small() -> None:
    assert FIXTURE.stat().st_size < 200_000


def test_fresh_schedule_and_rotary_equal_the_public_ones(oracle: dict) -> None:
    for key, value in oracle["state"].items():
        if key.startswith("noise_scheduler.") or key.endswith("rotary_emb.freqs"):
            assert torch.equal(oracle["fresh_state"][key], value), key


def test_oracle_forward(oracle: dict, oracle_model: DiffusionPrior) -> None:
    tensors = oracle["tensors"]
    x, t, brain = tensors["inputs.image_tokens"], tensors["inputs.timesteps"], tensors["inputs.brain_tokens"]
    with torch.no_grad():
        forward = oracle_model.net(x, t, brain)
        guided = oracle_model.net.forward_with_cond_scale(x, t, brain, cond_scale=oracle["guidance"]["forward_guided"])
    torch.testing.assert_close(forward, tensors["outputs.forward"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided, tensors["outputs.forward_guided"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "n_steps", "atol"), [("ddim20", 20, 1e-5), ("ddim7_guided", 7, 1e-4), ("ddpm", 100, 1e-5)]
)
def test_oracle_sampling(oracle: dict, oracle_model: DiffusionPrior, key: str, n_steps: int, atol: float) -> None:
    brain = oracle["tensors"]["inputs.brain_tokens"]
    guidance = oracle["guidance"].get(key, 1.0)
    sample = oracle_model.sample(
        brain, n_steps=n_steps, generator=_seeded(oracle["seeds"][key]), guidance_scale=guidance
    )
    torch.testing.assert_close(sample, oracle["tensors"][f"outputs.{key}"], rtol=1e-5, atol=atol)


def test_oracle_training_loss(oracle: dict, oracle_model: DiffusionPrior) -> None:
    tensors = oracle["tensors"]
    with torch.no_grad():
        loss = oracle_model.loss(
            tensors["inputs.image_tokens"], tensors["inputs.brain_tokens"], generator=_seeded(oracle["seeds"]["loss"])
        )
    torch.testing.assert_close(loss.reshape(1), tensors["outputs.loss"], rtol=1e-5, atol=1e-6)


def test_oracle_under_autocast(oracle: dict, oracle_model: DiffusionPrior) -> None:
    """MindEye2 runs the fp32 model under fp16 autocast (spec §5.1); the eps and dtype quirks must follow it."""
    tensors = oracle["tensors"]
    x, t, brain = tensors["inputs.image_tokens"], tensors["inputs.timesteps"], tensors["inputs.brain_tokens"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        forward = oracle_model.net(x, t, brain.bfloat16()).float()
    with torch.autocast("cpu", dtype=torch.float16):
        sample = oracle_model.sample(brain.half(), n_steps=20, generator=_seeded(oracle["seeds"]["ddim20"])).float()
    torch.testing.assert_close(forward, tensors["outputs.forward_autocast_bf16"], rtol=0, atol=1e-2)
    torch.testing.assert_close(sample, tensors["outputs.ddim20_autocast_fp16"], rtol=0, atol=2e-3)


def test_oracle_rel_pos_buckets(oracle: dict) -> None:
    offsets = torch.arange(-600, 601)
    buckets = relative_position_bucket(offsets, 32, 128)
    assert torch.equal(buckets.to(torch.int32), oracle["tensors"]["outputs.rel_pos_buckets"])
