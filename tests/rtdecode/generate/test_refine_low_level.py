"""SDXL img2img refinement (spec §5.2) and the low-level decode (spec §5.1 step 6), on tiny random folders."""

import pytest
import torch

from rtdecode.errors import ComponentMissingError, GenerateError
from rtdecode.generate.low_level import SD1_LATENT_SCALE, LowLevelDecoder
from rtdecode.generate.random_components import write_random_low_level_vae, write_random_refiner
from rtdecode.generate.refine import NEGATIVE_PROMPT, Refiner
from rtdecode.generate.sampler import sampling_sigmas


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return Refiner.from_folder(write_random_refiner(tmp_path_factory.mktemp("refiner")))


@pytest.fixture(scope="module")
def low_level(tmp_path_factory):
    return LowLevelDecoder.from_folder(write_random_low_level_vae(tmp_path_factory.mktemp("low_level_vae")))


def record_unet_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls, handle


def test_refinement_runs_12_guided_steps_from_sigma_1_51(refiner):
    calls, handle = record_unet_calls(refiner.unet)
    try:
        refiner.refine_latents(torch.randn(1, 4, 16, 16), ["a dog"], seed=0)
    finally:
        handle.remove()
    assert len(calls) == 12
    assert all(args[0].shape[0] == 2 for args, _ in calls)  # unconditional and conditional in one batch
    assert calls[0][0][1].tolist() == [479, 479]  # DDPM index of sigma 1.5092


def test_conditioning_is_sdxl_text_conditioning_of_caption_and_negative_prompt(refiner):
    """Oracle: the two CLIP text encoders called directly (penultimate layers concatenated; bigG's pooled
    projection) and the size vector (768, 768, 0, 0, 1024, 1024)."""
    calls, handle = record_unet_calls(refiner.unet)
    try:
        refiner.refine_latents(torch.randn(1, 4, 16, 16), ["a red bus"], seed=0)
    finally:
        handle.remove()
    kwargs = calls[0][1]
    pipe = refiner.pipeline

    def encode(text):
        layers, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids, output_hidden_states=True)
            layers.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the second encoder (text_embeds)
        return torch.cat(layers, dim=-1), pooled

    with torch.no_grad():
        negative, negative_pooled = encode(NEGATIVE_PROMPT)
        positive, positive_pooled = encode("a red bus")
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat([negative, positive]))
    added = kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], torch.cat([negative_pooled, positive_pooled]))
    assert added["time_ids"].tolist() == [[768, 768, 0, 0, 1024, 1024]] * 2


def test_a_network_predicting_no_noise_leaves_the_start_latent(refiner):
    """With eps = 0 every Euler step is the identity, exposing the start: z + n * sigma_start, n the seed's draw."""
    weight, bias = refiner.unet.conv_out.weight.data.clone(), refiner.unet.conv_out.bias.data.clone()
    refiner.unet.conv_out.weight.data.zero_()
    refiner.unet.conv_out.bias.data.zero_()
    try:
        latents = torch.randn(1, 4, 16, 16)
        out = refiner.refine_latents(latents, ["a dog"], seed=7)
    finally:
        refiner.unet.conv_out.weight.data.copy_(weight)
        refiner.unet.conv_out.bias.data.copy_(bias)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, latents + noise * sampling_sigmas(25)[13])


def test_the_image_path_encodes_a_posterior_sample_and_is_deterministic(refiner):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = refiner.refine(images, ["a dog", "a cat"], seed=3)
    assert first.shape == (2, 3, 32, 32) and 0.0 <= first.min() and first.max() <= 1.0
    torch.testing.assert_close(refiner.refine(images, ["a dog", "a cat"], seed=3), first, rtol=0, atol=0)
    assert not torch.equal(refiner.refine(images, ["a dog", "a cat"], seed=4), first)
    posterior = refiner.vae.encode(images * 2 - 1).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    encoded = refiner.encode_image(images, torch.Generator().manual_seed(5))
    torch.testing.assert_close(encoded, (posterior.mean + posterior.std * noise) * refiner.scale_factor)


def test_captions_must_match_the_batch(refiner):
    with pytest.raises(GenerateError, match="1 captions for a batch of 2 latents"):
        refiner.refine_latents(torch.randn(2, 4, 16, 16), ["a dog"], seed=0)


def test_a_missing_refiner_part_names_the_file(tmp_path):
    with pytest.raises(ComponentMissingError, match="model_index.json not found.*refiner_dir"):
        Refiner.from_folder(tmp_path)


def test_the_low_level_decode_is_the_published_mapping(low_level):
    latents = torch.randn(2, 4, 7, 9)
    expected = (low_level.vae.decode(latents / SD1_LATENT_SCALE).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(low_level.decode(latents), expected)
    assert low_level.decode(latents).shape == (2, 3, 14, 18)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (torch.randn(1, 3, 7, 7), r"shape \(batch, 4, h, w\), got \(1, 3, 7, 7\)"),
        (torch.full((1, 4, 7, 7), float("nan")), "NaN or inf"),
    ],
)
def test_bad_low_level_latents_are_refused(low_level, latents, message):
    with pytest.raises(GenerateError, match=message):
        low_level.decode(latents)


def test_a_missing_low_level_vae_names_the_file(tmp_path):
    with pytest.raises(ComponentMissingError, match=r"config.json not found.*low_level_vae_dir"):
        LowLevelDecoder.from_folder(tmp_path / "nowhere")
