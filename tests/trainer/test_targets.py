"""Frozen targets with real tiny networks: a tiny open_clip tower and a tiny SD-family AutoencoderKL."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rtdecode.errors import TrainDataError, TrainError
from rtdecode.generate.random_components import build_low_level_vae, write_random_low_level_vae
from rtdecode.models.embedder import ImageEmbedder
from trainer.targets import LatentTargets, TokenTargets

# 32x32 images, 8x8 patches -> 16 tokens of width 24 (as in tests/rtdecode/models/test_embedder.py).
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12, "mlp_ratio": 2.0},
}
N_IMAGES = 7
LATENT_SIZE = 8  # the tiny VAE downsamples 2x: 16 px images -> 8x8 latents


class ArrayImages:
    """An ImageStore over an in-memory array; counts the images it was asked for."""

    def __init__(self, array: np.ndarray, identity: str, *, fail_after: int | None = None) -> None:
        self.array = array
        self._identity = identity
        self.n_read = 0
        self.fail_after = fail_after

    @property
    def n_images(self) -> int:
        return self.array.shape[0]

    @property
    def identity(self) -> str:
        return self._identity

    def read(self, indices: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and self.n_read >= self.fail_after:
            raise OSError("disk went away")
        self.n_read += len(indices)
        return self.array[indices]


def _images(size_px: int = 32, *, seed: int = 0, identity: str = "images-a", **kwargs) -> ArrayImages:
    array = np.random.default_rng(seed).random((N_IMAGES, 3, size_px, size_px), dtype=np.float32)
    return ArrayImages(array, identity, **kwargs)


def _embedder(seed: int = 0) -> ImageEmbedder:
    torch.manual_seed(seed)
    return ImageEmbedder.from_config(TINY_CONFIG)


def _vae(seed: int = 0):
    torch.manual_seed(seed)
    return build_low_level_vae("tiny")


def _tokens(images, cache_path=None, *, seed: int = 0, identity: str = "tiny-seed0", batch_size: int = 3):
    return TokenTargets(
        _embedder(seed),
        images,
        embedder_identity=identity,
        cache_path=cache_path,
        batch_size=batch_size,
        progress=False,
    )


def _file_state(path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def test_tokens_on_the_fly_are_the_embedder_tokens():
    images = _images()
    targets = _tokens(images)
    assert targets.shape == (16, 24)
    rows = targets.get(np.array([4, 1]))
    assert rows.dtype == torch.float32 and rows.device.type == "cpu" and rows.shape == (2, 16, 24)
    expected = targets.embedder.embed(torch.from_numpy(images.array[[4, 1]]))
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)
    assert targets.describe() == "bigG tokens 16x24 computed on the fly (7 images)"


def test_cached_tokens_equal_on_the_fly_to_fp16_precision(tmp_path):
    cache = tmp_path / "cache" / "tokens.npy"
    cached = _tokens(_images(), cache)
    cached.prepare()
    on_the_fly = _tokens(_images())
    everything = np.arange(N_IMAGES)
    torch.testing.assert_close(cached.get(everything), on_the_fly.get(everything), rtol=1e-3, atol=1e-4)
    stored = np.load(cache, mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (N_IMAGES, 16, 24)
    sidecar = json.loads(cache.with_suffix(".json").read_text())
    assert sidecar["complete"] is True
    assert sidecar["images"] == "images-a" and sidecar["embedder"] == "tiny-seed0" and sidecar["n_images"] == N_IMAGES
    assert sidecar["scaling"] == "mindeye2" and sidecar["shape"] == [16, 24]
    assert cached.describe() == f"bigG tokens 16x24 from cache {cache} (7 images)"


def test_indices_in_any_order_with_repeats(tmp_path):
    indices = np.array([5, 0, 5, 2, 0, 6])
    for cache_path in (None, tmp_path / "tokens.npy"):
        targets = _tokens(_images(), cache_path)
        rows = targets.get(indices)
        singles = torch.cat([targets.get(np.array([i])) for i in indices])
        torch.testing.assert_close(rows, singles, rtol=0, atol=0)
        assert not torch.equal(rows[0], rows[1])
        assert targets.get(np.array([], dtype=np.int64)).shape == (0, 16, 24)


def test_on_the_fly_computes_each_distinct_image_once():
    images = _images()
    _tokens(images).get(np.array([3, 3, 3, 1]))
    assert images.n_read == 2


def test_a_matching_cache_is_reused_untouched(tmp_path):
    cache = tmp_path / "tokens.npy"
    first = _tokens(_images(), cache)
    first.prepare()
    before = _file_state(cache), _file_state(cache.with_suffix(".json"))
    images = _images()
    second = _tokens(images, cache)
    second.prepare()
    assert (_file_state(cache), _file_state(cache.with_suffix(".json"))) == before
    assert images.n_read == 0  # no image was embedded
    torch.testing.assert_close(second.get(np.arange(N_IMAGES)), first.get(np.arange(N_IMAGES)), rtol=0, atol=0)


def test_get_builds_the_cache_when_prepare_was_not_called(tmp_path):
    cache = tmp_path / "tokens.npy"
    rows = _tokens(_images(), cache).get(np.array([2]))
    assert json.loads(cache.with_suffix(".json").read_text())["complete"] is True
    torch.testing.assert_close(rows, _tokens(_images()).get(np.array([2])), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("field", "value", "kwargs", "images_kwargs"),
    [
        ("embedder", "tiny-seed1", {"seed": 1, "identity": "tiny-seed1"}, {}),
        ("images", "images-b", {}, {"seed": 5, "identity": "images-b"}),
    ],
)
def test_a_cache_with_another_key_is_rebuilt(tmp_path, caplog, field, value, kwargs, images_kwargs):
    cache = tmp_path / "tokens.npy"
    _tokens(_images(), cache).prepare()
    images = _images(**images_kwargs)
    rebuilt = _tokens(images, cache, **kwargs)
    with caplog.at_level(logging.WARNING, logger="trainer.targets"):
        rebuilt.prepare()
    assert images.n_read == N_IMAGES
    message = caplog.text
    assert str(cache) in message and repr(field) in message
    fresh = _tokens(_images(**images_kwargs), **kwargs)
    torch.testing.assert_close(rebuilt.get(np.arange(N_IMAGES)), fresh.get(np.arange(N_IMAGES)), rtol=1e-3, atol=1e-4)
    assert json.loads(cache.with_suffix(".json").read_text())[field] == value


@pytest.mark.parametrize("damage", ["incomplete", "no_sidecar", "truncated_data"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    cache = tmp_path / "tokens.npy"
    _tokens(_images(), cache).prepare()
    sidecar = cache.with_suffix(".json")
    stored = np.load(cache, mmap_mode="r+")
    stored[:] = 0  # what is on disk is wrong: a rebuild repairs it, trusting it would not
    stored.flush()
    del stored
    if damage == "incomplete":
        key = json.loads(sidecar.read_text())
        del key["complete"]
        sidecar.write_text(json.dumps(key))
    elif damage == "no_sidecar":
        sidecar.unlink()
    else:
        cache.write_bytes(cache.read_bytes()[:200])
    images = _images()
    targets = _tokens(images, cache)
    targets.prepare()
    assert images.n_read == N_IMAGES
    expected = _tokens(_images()).get(np.arange(N_IMAGES))
    torch.testing.assert_close(targets.get(np.arange(N_IMAGES)), expected, rtol=1e-3, atol=1e-4)


def test_an_interrupted_build_is_not_trusted(tmp_path):
    cache = tmp_path / "tokens.npy"
    broken = _tokens(_images(fail_after=3), cache)
    with pytest.raises(OSError, match="disk went away"):
        broken.prepare()
    assert json.loads(cache.with_suffix(".json").read_text())["complete"] is False
    images = _images()
    _tokens(images, cache).prepare()
    assert images.n_read == N_IMAGES
    assert json.loads(cache.with_suffix(".json").read_text())["complete"] is True


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(TrainError, match="cache_path"):
        _tokens(_images(), tmp_path / "tokens.bin")
    with pytest.raises(TrainError, match="batch_size"):
        _tokens(_images(), batch_size=0)
    with pytest.raises(TrainError, match="embedder_identity"):
        _tokens(_images(), identity="")
    with pytest.raises(TrainDataError, match=r"\[0, 7\)"):
        _tokens(_images()).get(np.array([0, 7]))
    with pytest.raises(TrainDataError, match=r"\[0, 1\]"):
        _tokens(ArrayImages(np.full((2, 3, 32, 32), 2.0, dtype=np.float32), "bright")).get(np.array([0]))


def test_latents_are_the_scaled_mode_of_the_vae_on_2x_minus_1():
    images = _images(size_px=2 * LATENT_SIZE)
    vae = _vae()
    targets = LatentTargets(vae, images, latent_size=LATENT_SIZE, vae_identity="vae-seed0", progress=False)
    assert targets.shape == (4, LATENT_SIZE, LATENT_SIZE)
    rows = targets.get(np.array([6, 2, 6]))
    pixels = torch.from_numpy(images.array[[6, 2, 6]])
    with torch.no_grad():
        expected = 0.18215 * vae.encode(2 * pixels - 1).latent_dist.mode()
        unscaled_input = 0.18215 * vae.encode(pixels).latent_dist.mode()
    assert rows.shape == (3, 4, LATENT_SIZE, LATENT_SIZE) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(rows, unscaled_input, atol=1e-3)
    assert not torch.allclose(rows, expected / 0.18215, atol=1e-3)
    assert targets.describe() == "SD-VAE latents (x0.18215) 4x8x8 computed on the fly (7 images)"


def test_latent_scale_is_sd1_whatever_the_vae_config_says():
    images = _images(size_px=2 * LATENT_SIZE)
    torch.manual_seed(0)
    vae = build_low_level_vae("tiny")
    vae.register_to_config(scaling_factor=1.0)
    rows = LatentTargets(vae, images, latent_size=LATENT_SIZE, vae_identity="v", progress=False).get(np.array([0]))
    with torch.no_grad():
        expected = 0.18215 * vae.encode(2 * torch.from_numpy(images.array[[0]]) - 1).latent_dist.mode()
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)


def test_images_are_resized_bilinear_to_the_vae_input_size():
    images = _images(size_px=32)  # the tiny VAE needs 16 px for 8x8 latents
    vae = _vae()
    rows = LatentTargets(vae, images, latent_size=LATENT_SIZE, vae_identity="v", progress=False).get(np.array([1]))
    pixels = F.interpolate(
        torch.from_numpy(images.array[[1]]), size=(16, 16), mode="bilinear", align_corners=False, antialias=True
    )
    with torch.no_grad():
        expected = 0.18215 * vae.encode(2 * pixels - 1).latent_dist.mode()
    assert rows.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)


def test_cached_latents_from_a_vae_folder(tmp_path):
    folder = write_random_low_level_vae(tmp_path / "low_level_vae", "tiny", seed=3)
    cache = tmp_path / "latents.npy"
    kwargs = dict(latent_size=LATENT_SIZE, cache_path=cache, batch_size=2, progress=False)
    cached = LatentTargets.from_folder(folder, _images(size_px=16), **kwargs)
    cached.prepare()
    on_the_fly = LatentTargets.from_folder(folder, _images(size_px=16), latent_size=LATENT_SIZE, progress=False)
    indices = np.array([3, 0, 3, 6, 5])
    torch.testing.assert_close(cached.get(indices), on_the_fly.get(indices), rtol=1e-3, atol=1e-4)
    sidecar = json.loads(cache.with_suffix(".json").read_text())
    assert sidecar["scaling"] == 0.18215 and sidecar["shape"] == [4, LATENT_SIZE, LATENT_SIZE]
    assert sidecar["size_px"] == 16 and sidecar["complete"] is True
    before = _file_state(cache)
    images = _images(size_px=16)
    LatentTargets.from_folder(folder, images, **kwargs).prepare()
    assert _file_state(cache) == before and images.n_read == 0
    assert cached.describe() == f"SD-VAE latents (x0.18215) 4x8x8 from cache {cache} (7 images)"


def test_a_missing_vae_folder_names_the_folder_and_the_command(tmp_path):
    folder = tmp_path / "no_vae_here"
    with pytest.raises(TrainDataError) as caught:
        LatentTargets.from_folder(folder, _images(), latent_size=LATENT_SIZE)
    assert str(folder) in str(caught.value)
    assert "rtdecode model import-low-level-vae" in str(caught.value)
