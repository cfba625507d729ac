"""PixCorr and SSIM against their oracles: np.corrcoef and scikit-image 0.26 (structural_similarity, rgb2gray)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from rtdecode.errors import ConfigError
from rtdecode.evaluate.lowlevel import CHUNK_IMAGES, EVAL_SIZE_PX, LOWLEVEL_SIZE_PX, pixcorr, ssim, to_eval_size


def smooth_images(n_images: int, size_px: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random images with structure at several scales (low-res noise upsampled plus fine noise), in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n_images, 3, 8, 8, generator=generator, dtype=dtype)
    coarse = torch.nn.functional.interpolate(coarse, size=(size_px, size_px), mode="bicubic", align_corners=False)
    fine = torch.rand(n_images, 3, size_px, size_px, generator=generator, dtype=dtype)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1)


def skimage_ssim(recon: torch.Tensor, image: torch.Tensor) -> float:
    """The paper's SSIM call on one pair already at 425 px: rgb2gray, then structural_similarity."""
    recon_gray = rgb2gray(recon.permute(1, 2, 0).numpy())
    image_gray = rgb2gray(image.permute(1, 2, 0).numpy())
    return structural_similarity(
        recon_gray, image_gray, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def oracle_ssim(recons: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    recons, images = to_eval_size(recons, LOWLEVEL_SIZE_PX), to_eval_size(images, LOWLEVEL_SIZE_PX)
    return np.array([skimage_ssim(recon, image) for recon, image in zip(recons, images, strict=True)])


def oracle_pixcorr(recons: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    recons, images = to_eval_size(recons, LOWLEVEL_SIZE_PX), to_eval_size(images, LOWLEVEL_SIZE_PX)
    pairs = zip(recons.numpy(), images.numpy(), strict=True)
    return np.array([np.corrcoef(recon.reshape(-1), image.reshape(-1))[0, 1] for recon, image in pairs])


def known_pairs(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of kinds the metric must get right: unrelated, blurred, noisy, identical, and constant images."""
    generator = torch.Generator().manual_seed(7)
    images = smooth_images(4, EVAL_SIZE_PX, seed=1, dtype=dtype)
    unrelated = smooth_images(1, EVAL_SIZE_PX, seed=2, dtype=dtype)[0]
    blurred = T.functional.gaussian_blur(images[1:2], kernel_size=[9, 9], sigma=[2.0, 2.0])[0]
    noise = torch.randn(3, EVAL_SIZE_PX, EVAL_SIZE_PX, generator=generator, dtype=dtype)
    noisy = (images[2] + 0.1 * noise).clamp(0, 1)
    grey_02 = torch.full((3, EVAL_SIZE_PX, EVAL_SIZE_PX), 0.2, dtype=dtype)
    grey_07 = torch.full((3, EVAL_SIZE_PX, EVAL_SIZE_PX), 0.7, dtype=dtype)
    recons = torch.stack([unrelated, blurred, noisy, images[3], grey_02, grey_02, grey_02])
    truths = torch.stack([images[0], images[1], images[2], images[3], grey_02, grey_07, images[0]])
    return recons, truths


def test_to_eval_size_is_torchvision_resize_default_bilinear_antialiased():
    images = torch.rand(2, 3, 300, 200, generator=torch.Generator().manual_seed(0))
    resized = to_eval_size(images, EVAL_SIZE_PX)
    assert resized.shape == (2, 3, EVAL_SIZE_PX, EVAL_SIZE_PX) and resized.dtype == images.dtype
    assert torch.equal(resized, T.Resize((EVAL_SIZE_PX, EVAL_SIZE_PX))(images))
    aliased = T.Resize((EVAL_SIZE_PX, EVAL_SIZE_PX), antialias=False)(images)
    assert not torch.allclose(resized, aliased, atol=1e-3)  # the antialias choice is visible on downsampling


def test_ssim_float64_matches_scikit_image_on_known_pairs():
    recons, truths = known_pairs(torch.float64)
    ours = ssim(recons, truths).numpy()
    expected = oracle_ssim(recons, truths)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert ours[3] == pytest.approx(1.0, abs=1e-12)  # identical
    assert ours[4] == pytest.approx(1.0, abs=1e-12)  # identical constants
    assert ours[1] > ours[0] and ours[2] > ours[0]  # a blurred or noisy copy beats an unrelated image


def test_ssim_float32_matches_scikit_image_run_in_float32():
    recons, truths = known_pairs(torch.float32)
    ours = ssim(recons, truths).numpy()
    expected = oracle_ssim(recons, truths)  # scikit-image keeps float32 input in float32, as the paper ran it
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_ssim_is_the_same_across_chunk_boundaries():
    n_images = CHUNK_IMAGES + 3
    recons = smooth_images(n_images, 32, seed=3, dtype=torch.float32)
    truths = smooth_images(n_images, 32, seed=4, dtype=torch.float32)
    batched = ssim(recons, truths)
    single = torch.cat([ssim(recons[i : i + 1], truths[i : i + 1]) for i in (0, CHUNK_IMAGES - 1, CHUNK_IMAGES + 2)])
    torch.testing.assert_close(batched[[0, CHUNK_IMAGES - 1, CHUNK_IMAGES + 2]], single, rtol=0, atol=1e-12)
    np.testing.assert_allclose(batched[-2:].numpy(), oracle_ssim(recons[-2:], truths[-2:]), rtol=0, atol=1e-6)


def test_pixcorr_matches_np_corrcoef_per_pair():
    recons, truths = known_pairs(torch.float32)
    ours = pixcorr(recons[:4], truths[:4]).numpy()
    np.testing.assert_allclose(ours, oracle_pixcorr(recons[:4], truths[:4]), rtol=0, atol=1e-9)
    assert ours[3] == pytest.approx(1.0, abs=1e-12)


def test_pixcorr_of_an_image_and_its_negative_is_minus_one():
    images = smooth_images(3, 64, seed=5)
    np.testing.assert_allclose(pixcorr(images, 1.0 - images).numpy(), -1.0, rtol=0, atol=1e-12)


def test_pixcorr_of_unrelated_random_images_is_near_zero():
    # Pure noise at 64 px: about 12,288 independent values per image, so a pair's correlation has an sd of about
    # 0.009 (upsampling to 425 px adds no information). 0.05 is more than 5 sd.
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(8, 3, 64, 64, generator=generator)
    order = torch.randperm(8, generator=generator)
    values = pixcorr(images[order], images[order.roll(1)])  # shuffled, and no image meets itself
    assert values.abs().max() < 0.05


def test_pixcorr_of_a_constant_image_is_nan_as_np_corrcoef_gives():
    recons, truths = known_pairs(torch.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = oracle_pixcorr(recons[4:], truths[4:])
    assert np.isnan(expected).all() and torch.isnan(pixcorr(recons[4:], truths[4:])).all()


@pytest.mark.parametrize(
    ("recons", "images", "message"),
    [
        (torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16), "same shape"),
        (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16).double(), "dtype"),
        (torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), r"\(N >= 1, 3, H, W\)"),
        (torch.rand(2, 3, 16, 16) * 255, torch.rand(2, 3, 16, 16), r"\[0, 1\]"),
        (torch.randint(0, 255, (2, 3, 16, 16)), torch.rand(2, 3, 16, 16), "floating-point"),
    ],
)
def test_bad_inputs_are_named(recons, images, message):
    for metric in (pixcorr, ssim):
        with pytest.raises(ConfigError, match=message):
            metric(recons, images)
