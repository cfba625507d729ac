"""Resizing, MindEye2's final blend and image bytes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from rtdecode.errors import GenerateError
from rtdecode.generate.images import blend, encode_image, resize, to_uint8


def test_resize_matches_torchvision_resize_with_antialiasing():
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    expected = TF.resize(images, [32, 32], antialias=True)
    torch.testing.assert_close(resize(images, 32), expected, rtol=1e-5, atol=1e-5)


def test_blend_is_three_quarters_refined_at_the_output_size():
    refined = torch.full((1, 3, 48, 48), 0.8)
    low = torch.full((1, 3, 14, 14), 0.4)
    mixed = blend(refined, low, 0.75, 32)
    assert mixed.shape == (1, 3, 32, 32)
    torch.testing.assert_close(mixed, torch.full((1, 3, 32, 32), 0.75 * 0.8 + 0.25 * 0.4))
    with pytest.raises(GenerateError, match=r"blend weight must be in \[0, 1\], got 1.5"):
        blend(refined, low, 1.5, 32)


def test_bytes_decode_to_the_same_picture():
    rng = np.random.default_rng(0)
    pixels = to_uint8(torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(1)))
    assert pixels.shape == (24, 40, 3) and pixels.dtype == np.uint8
    png = Image.open(io.BytesIO(encode_image(pixels, "png")))
    np.testing.assert_array_equal(np.asarray(png), pixels)
    smooth = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 24, axis=0).repeat(3, axis=2)
    jpeg = np.asarray(Image.open(io.BytesIO(encode_image(smooth, "jpeg", jpeg_quality=95))))
    assert jpeg.shape == smooth.shape and np.abs(jpeg.astype(int) - smooth).mean() < 2
    with pytest.raises(GenerateError, match="image_format must be 'jpeg' or 'png', got 'gif'"):
        encode_image(pixels, "gif")
    with pytest.raises(GenerateError, match=r"expected an \(H, W, 3\) uint8 array, got float64"):
        encode_image(rng.random((4, 4, 3)))
