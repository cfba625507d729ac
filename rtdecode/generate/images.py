"""Image tensors to what leaves the GPU process: resizing, MindEye2's final blend, uint8 arrays, JPEG/PNG bytes.

Encoding is never the slow default: JPEG (about 1.5 ms at 768x768) or PNG at compression level 1, never PIL's default
PNG level 6 (about 230 ms) on the hot path (performance budget §6).
"""

import io
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from rtdecode.errors import GenerateError

ImageFormat = Literal["jpeg", "png"]


def resize(images: Tensor, size_px: int) -> Tensor:
    """Images (B, 3, H, W) resized to ``size_px`` square, bilinear with antialiasing (torchvision ``Resize``'s
    tensor behaviour, which the public code used)."""
    if images.shape[-1] == size_px and images.shape[-2] == size_px:
        return images
    return F.interpolate(images.float(), size=(size_px, size_px), mode="bilinear", antialias=True, align_corners=False)


def blend(refined: Tensor, low_level: Tensor, refined_weight: float, size_px: int) -> Tensor:
    """``w * refined + (1 - w) * low_level`` at ``size_px`` (MindEye2: 0.75 and 256, the paper's 4:1)."""
    if not 0.0 <= refined_weight <= 1.0:
        raise GenerateError(f"blend weight must be in [0, 1], got {refined_weight}")
    mixed = refined_weight * resize(refined, size_px) + (1.0 - refined_weight) * resize(low_level, size_px)
    return mixed.clamp(0.0, 1.0)


def to_uint8(image: Tensor) -> np.ndarray:
    """One image (3, H, W) in [0, 1] -> an (H, W, 3) uint8 array."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise GenerateError(f"expected one RGB image (3, H, W), got shape {tuple(image.shape)}")
    scaled = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return scaled.permute(1, 2, 0).cpu().numpy()


def encode_image(pixels: np.ndarray, image_format: ImageFormat = "jpeg", jpeg_quality: int = 90) -> bytes:
    """An (H, W, 3) uint8 array as JPEG (quality ``jpeg_quality``) or fast PNG (level 1) bytes."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise GenerateError(f"expected an (H, W, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    picture = Image.fromarray(pixels)
    if image_format == "jpeg":
        picture.save(buffer, format="JPEG", quality=jpeg_quality)
    elif image_format == "png":
        picture.save(buffer, format="PNG", compress_level=1)
    else:
        raise GenerateError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    return buffer.getvalue()
