"""The sgm Euler sampler: its grid (spec second §5.3), its denoiser, and diffusers' Euler scheduler as an oracle."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

from rtdecode.generate.sampler import (
    Conditioning,
    EpsDenoiser,
    euler_sample,
    sampling_sigmas,
    step_indices,
    table_sigmas,
    unet_noise_net,
)


def diffusers_euler(**overrides):
    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **overrides)


def test_38_steps_visit_the_published_ddpm_indices():
    indices = step_indices(38)
    assert len(indices) == 38
    assert list(indices[-3:]) == [946, 972, 999] and list(indices[:2]) == [26, 52]


def test_the_start_sigmas_are_the_published_ones():
    unclip = sampling_sigmas(38)
    assert unclip.shape == (39,) and unclip[-1] == 0 and torch.all(unclip[:-1] > unclip[1:])
    assert unclip[0].item() == pytest.approx(14.6146, abs=1e-4)
    refine = sampling_sigmas(25)[13:]
    assert len(refine) - 1 == 12  # 12 Euler steps
    assert refine[0].item() == pytest.approx(1.5092, abs=1e-4)
    assert step_indices(25)[::-1][13] == 479


def test_the_sigma_table_matches_diffusers_scaled_linear():
    scheduler = diffusers_euler()
    reference = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    np.testing.assert_allclose(table_sigmas().numpy(), reference.numpy(), rtol=1e-4)  # diffusers: float32 table


def test_the_denoiser_snaps_sigma_and_scales_the_input():
    seen = {}

    def net(x, index, cond):
        seen.update(x=x, index=index)
        return torch.full_like(x, 0.5)

    table = table_sigmas()
    x = torch.randn(2, 4, 3, 3)
    sigma = torch.stack([table[500] * 1.0001, table[26]])  # the first is off the table: snapped to index 500
    denoised = EpsDenoiser(net)(x, sigma, Conditioning(torch.zeros(2, 1, 1), {}))
    assert seen["index"].tolist() == [500, 26]
    snapped = torch.stack([table[500], table[26]]).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], x / torch.sqrt(snapped**2 + 1))
    torch.testing.assert_close(denoised, x - snapped * 0.5)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=12,
        attention_head_dim=(2, 4),
        sample_size=8,
    )
    return model.eval()


def test_guided_euler_matches_diffusers_euler_scheduler_on_the_same_grid(unet):
    """diffusers' EulerDiscreteScheduler, given the same DDPM indices explicitly, is an independent oracle for the
    step rule, the input scaling and the guidance arithmetic (unconditional first, scale 5)."""
    n_steps, scale = 6, 5.0
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(1, 5, 12, generator=generator)
    uncontext = torch.randn(1, 5, 12, generator=generator)
    start = torch.randn(1, 4, 8, 8, generator=generator)
    sigmas = sampling_sigmas(n_steps)

    with torch.no_grad():
        ours = euler_sample(
            EpsDenoiser(unet_noise_net(unet)),
            start * sigmas[0],
            sigmas,
            Conditioning(context, {}),
            Conditioning(uncontext, {}),
            scale,
        )
        scheduler = diffusers_euler()
        scheduler.set_timesteps(timesteps=[int(i) for i in step_indices(n_steps)[::-1]])
        x = start * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps = unet(x_in, t, encoder_hidden_states=torch.cat([uncontext, context])).sample
            eps_u, eps_c = eps.chunk(2)
            x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_guidance_scale_one_makes_a_single_unguided_pass(unet):
    calls = []
    net = unet_noise_net(unet)

    def counting(x, index, cond):
        calls.append(x.shape[0])
        return net(x, index, cond)

    cond = Conditioning(torch.randn(1, 5, 12), {})
    with torch.no_grad():
        euler_sample(EpsDenoiser(counting), torch.randn(1, 4, 8, 8), sampling_sigmas(3), cond, cond, 1.0)
    assert calls == [1, 1, 1]


def test_a_step_count_outside_the_schedule_is_refused():
    with pytest.raises(ValueError, match="n_steps must be in 1..1000, got 0"):
        step_indices(0)
