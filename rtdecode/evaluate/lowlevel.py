"""The paper's low-level image metrics (spec §6): PixCorr and SSIM, in torch, batched.

Protocol: reconstructions and ground-truth images are first resized to ``EVAL_SIZE_PX`` (256) with
:func:`to_eval_size`; each metric then resizes both to ``LOWLEVEL_SIZE_PX`` (425) itself and scores every pair.

- PixCorr: Pearson correlation of the flattened RGB pixels of each pair (the metric is the mean over pairs).
- SSIM: grayscale with scikit-image's ``rgb2gray`` weights, then the SSIM of scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)``:
  local means, variances and covariance from a Gaussian window (sigma 1.5, truncated at 3.5 sigma, so 11 taps),
  constants C1 = (0.01 * 1)^2 and C2 = (0.03 * 1)^2, and the mean of the SSIM map over the image less a border of
  the window radius (5 px). scikit-image filters the whole image (reflecting at the border) and then drops that
  border, so no value it averages depends on the reflection: a "valid" convolution computes exactly those values.

Resizing and the SSIM arithmetic run in the input's floating dtype (float32 in the protocol, as in the paper's
notebook; pass float64 tensors for a float64 computation); sums (the Gaussian filter's, the per-image statistics)
are accumulated in float64, as scipy.ndimage, ``np.corrcoef`` and scikit-image's mean do. Images are processed
``CHUNK_IMAGES`` at a time so 1000 images at 425 px fit in a few hundred MB. Everything runs on the tensors' device.
No scikit-image at run time; it is the tests' oracle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rtdecode.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

EVAL_SIZE_PX = 256  # both image sets are resized to this before every image metric
LOWLEVEL_SIZE_PX = 425  # PixCorr and SSIM resize to this
GRAY_WEIGHTS_RGB = (0.2125, 0.7154, 0.0721)  # scikit-image rgb2gray (ITU-R BT.709 luma)
SSIM_SIGMA_PX = 1.5
SSIM_TRUNCATE_SIGMAS = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 1.0
CHUNK_IMAGES = 32


def to_eval_size(images: Tensor, size_px: int) -> Tensor:
    """Resize ``(N, 3, H, W)`` images with values in [0, 1] to ``(N, 3, size_px, size_px)``.

    Bilinear with antialiasing, as ``torchvision.transforms.Resize((size_px, size_px))`` does by default on tensors
    (torchvision >= 0.17: ``antialias=True``), which is what the paper's notebook used. The output is square whatever
    the input's aspect ratio (the NSD and reconstructed images are square). The dtype and device are kept.
    """
    import torchvision.transforms.functional as TF

    _check_images("images", images)
    if not isinstance(size_px, int) or size_px < 1:
        raise ConfigError(f"to_eval_size: size_px must be a positive integer, got {size_px!r}")
    return TF.resize(images, [size_px, size_px], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def pixcorr(recons: Tensor, images: Tensor, size_px: int = LOWLEVEL_SIZE_PX) -> Tensor:
    """PixCorr per pair: the Pearson correlation of the flattened RGB pixels of ``recons[i]`` and ``images[i]``.

    Both are ``(N, 3, H, W)`` in [0, 1] with the same shape (``EVAL_SIZE_PX`` in the protocol) and are resized to
    ``size_px`` first. Returns an ``(N,)`` float64 tensor; the metric is its mean. A constant image has no
    correlation: its value is NaN, as ``np.corrcoef`` gives.
    """
    _check_pair(recons, images)
    values = [_pearson_rows(*_resized_pair(recons, images, start, size_px)) for start in _chunk_starts(recons)]
    return _concat(values)


def ssim(recons: Tensor, images: Tensor, size_px: int = LOWLEVEL_SIZE_PX) -> Tensor:
    """SSIM per pair, as scikit-image's ``structural_similarity`` with the paper's settings on grayscale images.

    Both are ``(N, 3, H, W)`` in [0, 1] with the same shape (``EVAL_SIZE_PX`` in the protocol) and are resized to
    ``size_px`` first. Returns an ``(N,)`` float64 tensor; the metric is its mean. Identical images give 1.
    """
    _check_pair(recons, images)
    radius_px = _ssim_radius_px()
    if size_px < 2 * radius_px + 1:
        raise ConfigError(f"ssim: size_px must be at least the window size {2 * radius_px + 1}, got {size_px}")
    values = []
    for start in _chunk_starts(recons):
        recon_chunk, image_chunk = _resized_pair(recons, images, start, size_px)
        values.append(_ssim_gray(_to_gray(recon_chunk), _to_gray(image_chunk)))
    return _concat(values)


def _check_images(name: str, images) -> None:
    """``images`` must be a floating ``(N, 3, H, W)`` tensor, N >= 1, with finite values in [0, 1]."""
    import torch

    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point torch tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ConfigError(f"{name} must have shape (N >= 1, 3, H, W), got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise ConfigError(
            f"{name} must hold finite values in [0, 1], got range [{float(images.min())}, {float(images.max())}]"
        )


def _check_pair(recons, images) -> None:
    """Both image sets are valid and pair up one to one (same shape, same dtype)."""
    _check_images("recons", recons)
    _check_images("images", images)
    if recons.shape != images.shape or recons.dtype != images.dtype:
        raise ConfigError(
            "recons and images must have the same shape and dtype (resize both to the same size first), got "
            f"{tuple(recons.shape)} {recons.dtype} and {tuple(images.shape)} {images.dtype}"
        )


def _chunk_starts(images) -> range:
    return range(0, images.shape[0], CHUNK_IMAGES)


def _resized_pair(recons, images, start: int, size_px: int):
    """One chunk of both sets, resized to ``size_px``."""
    stop = start + CHUNK_IMAGES
    return to_eval_size(recons[start:stop], size_px), to_eval_size(images[start:stop], size_px)


def _concat(values: list):
    import torch

    return torch.cat(values)


def _pearson_rows(first, second):
    """Pearson correlation of each item's flattened values with its pair's, accumulated in float64."""
    import torch

    first = first.reshape(first.shape[0], -1).double()
    second = second.reshape(second.shape[0], -1).double()
    first = first - first.mean(dim=1, keepdim=True)
    second = second - second.mean(dim=1, keepdim=True)
    covariance = (first * second).sum(dim=1)
    return covariance / torch.sqrt((first * first).sum(dim=1) * (second * second).sum(dim=1))


def _to_gray(images):
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` with scikit-image's ``rgb2gray`` weights, in the images' dtype."""
    import torch

    weights = torch.tensor(GRAY_WEIGHTS_RGB, dtype=images.dtype, device=images.device)
    return torch.einsum("nchw,c->nhw", images, weights).unsqueeze(1)


def _ssim_radius_px() -> int:
    """The Gaussian window's radius, rounded as scipy.ndimage's Gaussian filter rounds it (5 for sigma 1.5)."""
    return int(SSIM_TRUNCATE_SIGMAS * SSIM_SIGMA_PX + 0.5)


def _gaussian_taps(dtype, device):
    """The normalised 1-D Gaussian window (sigma ``SSIM_SIGMA_PX``, ``2 * radius + 1`` taps)."""
    import torch

    radius_px = _ssim_radius_px()
    offsets = torch.arange(-radius_px, radius_px + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA_PX) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _gaussian_valid(maps):
    """Separable Gaussian filter of ``(M, 1, H, W)`` maps keeping only the fully covered pixels.

    Like scipy.ndimage's Gaussian filter (which scikit-image calls): one pass per axis, height first, each pass
    summed in float64 and stored in the maps' dtype. Summing float32 in float32 instead shifts the SSIM of flat
    regions by ~1e-5, because their variance is a difference of two nearly equal means.
    """
    import torch

    taps = _gaussian_taps(torch.float64, maps.device)
    along_height = _correlate_valid(maps, taps, dim=-2).to(maps.dtype)
    return _correlate_valid(along_height, taps, dim=-1).to(maps.dtype)


def _correlate_valid(maps, taps, dim: int):
    """1-D correlation of ``maps`` with ``taps`` along ``dim``, "valid" part only, summed in float64.

    A sum of shifted slices rather than ``conv2d``: float64 convolution on CPU unfolds its input once per tap
    (11 copies of a chunk); this needs a float64 copy and the sum.
    """
    n_out = maps.shape[dim] - len(taps) + 1
    maps = maps.double()
    weights = taps.tolist()
    total = maps.narrow(dim, 0, n_out) * weights[0]
    for offset in range(1, len(weights)):
        total.add_(maps.narrow(dim, offset, n_out), alpha=weights[offset])
    return total


def _ssim_gray(first, second):
    """Mean SSIM of each pair of ``(N, 1, H, W)`` grayscale images (population covariance, data range 1)."""
    import torch

    n_images = first.shape[0]
    stacked = torch.cat([first, second, first * first, second * second, first * second])
    mean_1, mean_2, mean_11, mean_22, mean_12 = _gaussian_valid(stacked).split(n_images)
    variance_1 = mean_11 - mean_1 * mean_1
    variance_2 = mean_22 - mean_2 * mean_2
    covariance = mean_12 - mean_1 * mean_2
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    numerator = (2 * mean_1 * mean_2 + c1) * (2 * covariance + c2)
    denominator = (mean_1 * mean_1 + mean_2 * mean_2 + c1) * (variance_1 + variance_2 + c2)
    ssim_map = numerator / denominator
    return ssim_map.double().reshape(n_images, -1).mean(dim=1)
