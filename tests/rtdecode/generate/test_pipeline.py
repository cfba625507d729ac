"""End to end: brain embeddings -> caption, unCLIP, refinement, low-level blend -> image bytes (tiny random folders)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rtdecode.config import GenerateConfig, ModelsConfig
from rtdecode.errors import ComponentMissingError, GenerateError
from rtdecode.generate.pipeline import ImagePipeline
from rtdecode.generate.random_components import write_random_components

FAST = dict(unclip_steps=4, refine_steps=6, refine_start_step=3, output_size_px=24)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return ModelsConfig(**write_random_components(tmp_path_factory.mktemp("components")))


def inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        tokens=torch.randn(batch, 6, 24, generator=generator),
        caption_features=torch.randn(batch, 17, 16, generator=generator),
        low_level_latents=torch.randn(batch, 4, 7, 7, generator=generator),
    )


@pytest.fixture(scope="module")
def pipeline(models):
    return ImagePipeline.from_config(models, GenerateConfig(**FAST))


def test_embeddings_become_jpeg_bytes_with_every_stage(pipeline):
    batch = inputs()
    reconstructions = pipeline.generate(batch.pop("tokens"), seed=1, **batch)
    assert len(reconstructions) == 2
    first = reconstructions[0]
    assert first.final.shape == (24, 24, 3) and first.final.dtype == np.uint8
    assert first.unclip.shape == (32, 32, 3) and first.refined.shape == (32, 32, 3)
    assert first.low_level.shape == (14, 14, 3)
    assert isinstance(first.caption, str)
    assert {"caption", "unclip", "unclip_decode", "refine", "low_level_decode", "blend"} <= set(first.timings_ms)
    picture = Image.open(io.BytesIO(first.encoded("final", "jpeg")))
    assert picture.format == "JPEG" and picture.size == (24, 24)
    png = Image.open(io.BytesIO(first.encoded("unclip", "png")))
    np.testing.assert_array_equal(np.asarray(png), first.unclip)


def test_the_final_image_is_the_published_blend(pipeline):
    batch = inputs(batch=1)
    (result,) = pipeline.generate(batch.pop("tokens"), seed=2, **batch)
    refined = torch.from_numpy(result.refined).permute(2, 0, 1)[None].float() / 255
    low = torch.from_numpy(result.low_level).permute(2, 0, 1)[None].float() / 255
    from rtdecode.generate.images import blend

    expected = (blend(refined, low, 0.75, 24)[0].permute(1, 2, 0) * 255).numpy()
    assert np.abs(result.final.astype(float) - expected).max() <= 2.0  # from uint8 intermediates


def test_a_seed_reproduces_the_images(pipeline):
    runs = [pipeline.generate(**inputs(batch=1, seed=4), seed=9)[0] for _ in range(2)]
    np.testing.assert_array_equal(runs[0].final, runs[1].final)
    assert runs[0].caption == runs[1].caption
    other = pipeline.generate(**inputs(batch=1, seed=4), seed=10)[0]
    assert not np.array_equal(other.unclip, runs[0].unclip)


def test_latent_handoff_skips_the_unclip_decode(models):
    pipeline = ImagePipeline.from_config(models, GenerateConfig(**FAST, latent_handoff=True))
    (result,) = pipeline.generate(**inputs(batch=1), seed=1)
    assert result.unclip is None and result.refined.shape == (32, 32, 3)
    assert "unclip_decode" not in result.timings_ms
    assert "latent handoff" in pipeline.describe()


def test_refinement_and_captions_can_be_switched_off(models):
    settings = GenerateConfig(**FAST, refine=False, caption=False, low_level=False)
    pipeline = ImagePipeline.from_config(models, settings)
    (result,) = pipeline.generate(inputs(batch=1)["tokens"], seed=1)
    assert result.refined is None and result.caption is None and result.low_level is None
    assert result.final.shape == (24, 24, 3)
    assert pipeline.describe() == "unCLIP 4 steps, no caption, no refinement, no low-level blend"


def test_the_preview_is_the_low_level_image_and_is_reused(pipeline):
    batch = inputs(batch=1)
    preview = pipeline.preview(batch["low_level_latents"])
    assert preview.shape == (1, 3, 14, 14)
    (result,) = pipeline.generate(batch.pop("tokens"), seed=1, low_level_images=preview, **batch)
    assert "low_level_decode" not in result.timings_ms  # not decoded twice


def test_stages_and_consecutive_trials_draw_independent_noise():
    from rtdecode.generate.pipeline import stage_seed

    seeds = [stage_seed(trial, stage) for trial in range(50) for stage in ("prior", "unclip", "refine")]
    assert len(set(seeds)) == len(seeds)
    assert stage_seed(7, "unclip") == stage_seed(7, "unclip")


def test_a_missing_component_names_the_setting_and_the_command(models, tmp_path):
    unset = models.model_copy(update={"unclip_dir": None})
    with pytest.raises(ComponentMissingError, match=r"\[models\] unclip_dir is not set.*rtdecode model import-unclip"):
        ImagePipeline.from_config(unset, GenerateConfig())
    moved = models.model_copy(update={"caption_dir": tmp_path / "gone"})
    with pytest.raises(ComponentMissingError, match=r"caption_dir = .*gone: folder not found.*git-large-coco"):
        ImagePipeline.from_config(moved, GenerateConfig())


def test_refinement_without_captions_is_refused(models):
    with pytest.raises(GenerateError, match="refine = true needs caption = true"):
        ImagePipeline.from_config(models, GenerateConfig(caption=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(tokens=torch.full((2, 6, 24), float("nan"))), "NaN or inf"),
        (dict(tokens=torch.randn(2, 24)), r"tokens must be a \(batch, n_tokens, width\) tensor"),
        (dict(caption_features=None), "no caption_features were given"),
        (dict(low_level_latents=torch.randn(3, 4, 7, 7)), "batch sizes differ: tokens 2, other input 3"),
    ],
)
def test_bad_inputs_are_refused_clearly(pipeline, change, message):
    batch = {**inputs(), **change}
    with pytest.raises(GenerateError, match=message):
        pipeline.generate(batch.pop("tokens"), seed=0, **batch)
