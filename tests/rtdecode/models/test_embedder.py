"""ImageEmbedder: open_clip visual tokens after ln_post, class token dropped, MindEye2 preprocessing (spec §2.4)."""

import pytest
import torch
from safetensors.torch import save_file

from rtdecode.errors import CheckpointError, ModelError
from rtdecode.models.embedder import CLIP_MEAN, CLIP_STD, ImageEmbedder

# A tiny open_clip config in the named-config format: 32x32 images, 8x8 patches -> 4x4 = 16 tokens of width 24.
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12, "mlp_ratio": 2.0}
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": TINY_VISION,
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_model():
    """A whole tiny open_clip CLIP (text tower included), as a real checkpoint would hold."""
    import open_clip  # after rtdecode, whose import hook lets open_clip import torchvision on CPU torch

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CONFIG).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines so a wrong ln_post path shows
        for name, param in model.visual.named_parameters():
            if "ln_" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def safetensors_file(clip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, path)
    return path


def _images(n_images: int, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n_images, 3, height, width, generator=generator)


def _all_tokens_after_ln_post(tower, pixels: torch.Tensor) -> torch.Tensor:
    """ln_post over all tokens, class token first: computed from the tower's pieces."""
    patches = tower.conv1(pixels).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
    cls = tower.class_embedding.expand(pixels.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + tower.positional_embedding
    return tower.ln_post(tower.transformer(tower.ln_pre(x)))


def test_tokens_are_ln_post_of_all_tokens_without_class_token(safetensors_file):
    embedder = ImageEmbedder.from_weights(safetensors_file, model_config=TINY_CONFIG)
    images = _images(3)
    tokens = embedder.embed(images)
    assert tokens.shape == (3, 16, 24) == (3, embedder.n_tokens, embedder.width)
    with torch.no_grad():
        all_tokens = _all_tokens_after_ln_post(embedder.tower, embedder.preprocess(images))
    assert all_tokens.shape == (3, 17, 24)
    torch.testing.assert_close(tokens, all_tokens[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(tokens, all_tokens[:, :16], atol=1e-3)  # the class token is the one dropped
    # ln_post was applied: each token, with the LayerNorm affine undone, has mean 0 and variance 1.
    weight, bias = embedder.tower.ln_post.weight, embedder.tower.ln_post.bias
    standardised = (tokens - bias) / weight
    torch.testing.assert_close(standardised.mean(-1), torch.zeros(3, 16), rtol=0, atol=1e-4)
    torch.testing.assert_close(standardised.var(-1, unbiased=False), torch.ones(3, 16), rtol=0, atol=1e-3)


def test_weights_equal_open_clip_model_output(clip_model, safetensors_file):
    embedder = ImageEmbedder.from_weights(safetensors_file, model_config=TINY_CONFIG)
    images = _images(2, seed=4)
    clip_model.visual.output_tokens = True
    try:
        with torch.no_grad():
            _, reference = clip_model.visual(embedder.preprocess(images))
    finally:
        clip_model.visual.output_tokens = False
    torch.testing.assert_close(embedder.embed(images), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-no-mmap"])
def test_pt_round_trip_with_state_dict_entry_and_module_prefix(clip_model, safetensors_file, tmp_path, zipfile):
    path = tmp_path / "epoch_latest.pt"
    checkpoint = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip_model.state_dict().items()}}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zipfile)
    from_pt = ImageEmbedder.from_weights(path, model_config=TINY_CONFIG)
    from_safetensors = ImageEmbedder.from_weights(safetensors_file, model_config=TINY_CONFIG)
    for name, value in clip_model.visual.state_dict().items():
        assert torch.equal(from_pt.tower.state_dict()[name], value), name
    images = _images(2, seed=5)
    assert torch.equal(from_pt.embed(images), from_safetensors.embed(images))


def test_only_the_visual_tower_is_built(safetensors_file):
    import open_clip

    embedder = ImageEmbedder.from_weights(safetensors_file, model_config=TINY_CONFIG)
    names = set(embedder.tower.state_dict())
    assert "token_embedding.weight" not in names and "logit_scale" not in names
    assert names == set(open_clip.CLIP(**TINY_CONFIG).visual.state_dict())


def test_scalings_differ_by_the_mindeye2_rescale(safetensors_file):
    """mindeye2 on x equals conventional on (x+1)/2: the (x+1)/2 comes before the normalisation."""
    mindeye2 = ImageEmbedder.from_weights(safetensors_file, model_config=TINY_CONFIG, scaling="mindeye2")
    conventional = ImageEmbedder.from_weights(safetensors_file, model_config=TINY_CONFIG, scaling="conventional")
    images = _images(2, seed=6)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(mindeye2.preprocess(images), ((images + 1) / 2 - mean) / std, rtol=0, atol=1e-6)
    torch.testing.assert_close(conventional.preprocess(images), (images - mean) / std, rtol=0, atol=1e-6)
    torch.testing.assert_close(mindeye2.embed(images), conventional.embed((images + 1) / 2), rtol=0, atol=1e-5)
    assert not torch.allclose(mindeye2.embed(images), conventional.embed(images), atol=1e-2)
    # The same holds through the resize, which is linear and keeps constants.
    large = _images(2, 64, 48, seed=7)
    torch.testing.assert_close(mindeye2.preprocess(large), conventional.preprocess((large + 1) / 2), atol=1e-5, rtol=0)


def test_resize_passes_model_size_unchanged_and_antialiases_larger_images():
    embedder = ImageEmbedder.from_config(TINY_CONFIG, scaling="conventional")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    at_size = _images(1)
    assert torch.equal(embedder.preprocess(at_size), (at_size - mean) / std)
    constant = torch.full((1, 3, 75, 50), 0.25)
    torch.testing.assert_close(embedder.preprocess(constant) * std + mean, torch.full((1, 3, 32, 32), 0.25))
    # A 1-pixel checkerboard at 4x the model size: without the antialias blur, bicubic sampling with
    # align_corners lands on pixel centres and keeps the full +-0.5 contrast; the blur removes most of it.
    rows, cols = torch.meshgrid(torch.arange(125), torch.arange(125), indexing="ij")
    checker = ((rows + cols) % 2).float().expand(1, 3, 125, 125)
    unblurred = torch.nn.functional.interpolate(checker, size=(32, 32), mode="bicubic", align_corners=True)
    resized = embedder.preprocess(checker) * std + mean
    assert (unblurred - 0.5).abs().mean() > 0.45
    assert (resized - 0.5).abs().max() < 0.1
    assert resized.shape == (1, 3, 32, 32)


def test_batching_does_not_change_tokens():
    torch.manual_seed(2)
    embedder = ImageEmbedder.from_config(TINY_CONFIG, batch_size=2)
    images = _images(5, seed=8)
    together = embedder.embed(images)
    one_by_one = torch.cat([embedder.embed(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-6)
    assert not together.requires_grad


def test_real_size_layout_on_meta():
    import open_clip

    embedder = ImageEmbedder.from_config(open_clip.get_model_config("ViT-bigG-14"), device="meta")
    assert (embedder.n_tokens, embedder.width, embedder.image_size) == (256, 1664, (224, 224))
    assert sum(p.numel() for p in embedder.tower.parameters()) == 1_844_907_264
    assert len(embedder.tower.state_dict()) == 584  # 48 blocks x 12 + 8 (all 'visual.*' keys of the checkpoint)


def test_missing_weights_file_names_it_and_never_downloads(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(ModelError, match="open_clip_pytorch_model.bin") as info:
        ImageEmbedder.from_weights(missing)
    assert "ViT-bigG-14 laion2b_s39b_b160k" in str(info.value)


def test_wrong_and_misshaped_keys_are_listed(clip_model, tmp_path):
    state = {k: v.contiguous() for k, v in clip_model.state_dict().items()}
    state["visual.ln_post.scale"] = state.pop("visual.ln_post.weight")
    state["visual.proj"] = torch.zeros(24, 8)
    path = tmp_path / "renamed.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as info:
        ImageEmbedder.from_weights(path, model_config=TINY_CONFIG)
    message = str(info.value)
    assert "1 missing key(s):\n    ln_post.weight" in message
    assert "1 unexpected key(s):\n    ln_post.scale" in message
    assert "proj: expected (24, 16), found (24, 8)" in message
    assert "renamed.safetensors" in message


def test_checkpoint_without_visual_tower_is_refused(clip_model, tmp_path):
    path = tmp_path / "text_only.bin"
    torch.save({k: v for k, v in clip_model.state_dict().items() if not k.startswith("visual.")}, path)
    with pytest.raises(CheckpointError, match="missing key"):
        ImageEmbedder.from_weights(path, model_config=TINY_CONFIG)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(3, 32, 32), r"shape \(B, 3, H, W\)"),
        (torch.rand(2, 1, 32, 32), r"shape \(B, 3, H, W\)"),
        (torch.rand(2, 3, 32, 32) * 2 - 1, r"values in \[0, 1\], found range \[-"),
        (torch.full((1, 3, 32, 32), 255.0), r"found range \[255, 255\]"),
        (torch.full((1, 3, 32, 32), float("nan")), "found range"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_are_refused(images, message):
    embedder = ImageEmbedder.from_config(TINY_CONFIG)
    with pytest.raises(ModelError, match=message):
        embedder.embed(images)


def test_configs_with_another_token_path_are_refused():
    for change in ({"final_ln_after_pool": True}, {"pool_type": "avg"}, {"attentional_pool": True}):
        config = {**TINY_CONFIG, "vision_cfg": {**TINY_VISION, **change}}
        with pytest.raises(ModelError, match="default token path"):
            ImageEmbedder.from_config(config)
    with pytest.raises(ModelError, match="scaling must be one of"):
        ImageEmbedder.from_config(TINY_CONFIG, scaling="clip")
    with pytest.raises(ModelError, match="not an open_clip model config"):
        ImageEmbedder.from_weights(__file__, model_name="ViT-nonexistent")
