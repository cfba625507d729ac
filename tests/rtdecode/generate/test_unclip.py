"""The unCLIP sampler as the public code runs it (spec §5.1, second §5.3), on a tiny random unCLIP folder."""

import pytest
import torch

from rtdecode.errors import GenerateError
from rtdecode.generate.geometry import UnclipGeometry
from rtdecode.generate.sampler import sampling_sigmas
from rtdecode.generate.unclip import UnclipGenerator
from rtdecode.generate.unclip_folder import write_random_unclip

GEOMETRY = UnclipGeometry.tiny()
SETTINGS = dict(n_steps=5)


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    folder = write_random_unclip(tmp_path_factory.mktemp("unclip"), GEOMETRY)
    return UnclipGenerator.from_folder(folder, **SETTINGS)


def tokens(batch=1, seed=0):
    return torch.randn(batch, 6, GEOMETRY.context_dim, generator=torch.Generator().manual_seed(seed))


def test_a_seed_gives_the_same_latents_and_another_seed_others(unclip):
    first = unclip.sample(tokens(2), seed=11)
    assert first.shape == (2, 4, 16, 16)
    torch.testing.assert_close(unclip.sample(tokens(2), seed=11), first, rtol=0, atol=0)
    assert not torch.allclose(unclip.sample(tokens(2), seed=12), first)


def test_the_sampler_is_conditioned_as_published(unclip):
    """Guided batches put noise tokens (not zeros) first, the brain tokens second, the same size vector on both."""
    calls = []
    hook = unclip.unet.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        unclip.sample(tokens(1), seed=3)
    finally:
        hook.remove()
    assert len(calls) == 5
    args, kwargs = calls[0]
    generator = torch.Generator().manual_seed(3)
    torch.randn(1, 4, 16, 16, generator=generator)  # z is drawn first
    noise_tokens = torch.randn(1, 6, GEOMETRY.context_dim, generator=generator)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat([noise_tokens, tokens(1)]))
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[768, 768, 0, 0]] * 2
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 0)
    assert args[1].tolist() == [999, 999]  # the first DDPM index


def test_a_network_predicting_no_noise_exposes_the_published_start_latent(unclip):
    """With eps = 0 every Euler step is the identity: the result is z + (n + 0.04 * offset) * sigma_0."""
    saved = unclip.unet.conv_out.weight.data.clone(), unclip.unet.conv_out.bias.data.clone()
    unclip.unet.conv_out.weight.data.zero_()
    unclip.unet.conv_out.bias.data.zero_()
    try:
        out = unclip.sample(tokens(2), seed=5)
    finally:
        unclip.unet.conv_out.weight.data.copy_(saved[0])
        unclip.unet.conv_out.bias.data.copy_(saved[1])
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 16, 16, generator=generator)
    torch.randn(2, 6, GEOMETRY.context_dim, generator=generator)  # the unconditional tokens
    n = torch.randn(2, 4, 16, 16, generator=generator)
    offset = torch.randn(2, generator=generator).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, z + (n + 0.04 * offset) * sampling_sigmas(5)[0])


def test_decoding_maps_to_x_times_0_8_plus_0_2(unclip):
    latents = torch.randn(1, 4, 16, 16)
    decoded = unclip.vae.decode(latents / GEOMETRY.scale_factor).sample
    torch.testing.assert_close(unclip.decode(latents), (decoded * 0.8 + 0.2).clamp(0, 1))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.randn(6, GEOMETRY.context_dim), r"shape \(batch, n_tokens, 24\).*got \(6, 24\)"),
        (torch.randn(1, 6, 1664), r"got \(1, 6, 1664\)"),
        (torch.full((1, 6, GEOMETRY.context_dim), float("nan")), "NaN or inf"),
    ],
)
def test_bad_tokens_are_refused(unclip, bad, message):
    with pytest.raises(GenerateError, match=message):
        unclip.sample(bad, seed=0)
