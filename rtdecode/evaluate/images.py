"""Reconstructions and the images that were seen, paired by file name, as the metrics take them.

``--recons DIR`` and ``--images DIR`` hold one picture per trial or image, the same stem in both (``img-0042.png``
and ``img-0042.jpg`` pair). Every picture is read as RGB and resized to 256 x 256 (bilinear, antialiased: the
paper's first step, spec §6), giving float32 tensors in [0, 1] of shape (N, 3, 256, 256) in the order of the sorted
stems. A stem present in only one folder, an unreadable file or an empty folder is an error that names them.
"""

import dataclasses
from pathlib import Path

import numpy as np

from rtdecode.errors import ConfigError
from rtdecode.evaluate.lowlevel import EVAL_SIZE_PX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_NAMES_SHOWN = 8


@dataclasses.dataclass(frozen=True)
class ImagePairs:
    """Paired pictures: row i of ``recons`` is the reconstruction of row i of ``images``, both named ``ids[i]``."""

    ids: tuple[str, ...]
    recons: object  # torch.Tensor (N, 3, 256, 256) float32 in [0, 1]
    images: object

    def __len__(self) -> int:
        return len(self.ids)


def pictures_in(folder: Path, what: str) -> dict[str, Path]:
    """Stem -> file of the pictures in ``folder`` (``what`` names the option in errors)."""
    if not folder.is_dir():
        raise ConfigError(f"{what} {folder}: not a folder")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{what} {folder}: no pictures ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise ConfigError(
                f"{what} {folder}: two pictures named {path.stem!r} ({by_stem[path.stem].name}, {path.name})"
            )
        by_stem[path.stem] = path
    return by_stem


def load_pairs(recons_dir: Path, images_dir: Path) -> ImagePairs:
    """Read both folders and pair them by stem (see the module docstring)."""
    import torch

    recons, images = pictures_in(recons_dir, "--recons"), pictures_in(images_dir, "--images")
    _check_same_stems(recons, images, recons_dir, images_dir)
    ids = tuple(sorted(recons))
    return ImagePairs(
        ids,
        torch.stack([read_picture(recons[stem]) for stem in ids]),
        torch.stack([read_picture(images[stem]) for stem in ids]),
    )


def read_picture(path: Path, size_px: int = EVAL_SIZE_PX):
    """One picture as a (3, size, size) float32 tensor in [0, 1]."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from rtdecode.evaluate.lowlevel import to_eval_size

    try:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"{path}: not a readable picture ({err})") from None
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    return to_eval_size(tensor, size_px)[0].clamp(0.0, 1.0)


def _check_same_stems(recons: dict, images: dict, recons_dir: Path, images_dir: Path) -> None:
    only_recons, only_images = sorted(set(recons) - set(images)), sorted(set(images) - set(recons))
    if only_recons or only_images:
        raise ConfigError(
            f"--recons {recons_dir} and --images {images_dir} must hold the same names: "
            f"{_names(only_recons)} only in --recons, {_names(only_images)} only in --images"
        )


def _names(stems: list[str]) -> str:
    if not stems:
        return "none"
    shown = ", ".join(stems[:MAX_NAMES_SHOWN])
    return f"{len(stems)} ({shown}{', ...' if len(stems) > MAX_NAMES_SHOWN else ''})"
