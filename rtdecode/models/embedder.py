"""The OpenCLIP ViT-bigG/14 image embedder that makes MindEye2's target tokens (spec §2.4).

MindEye2's clip_proj, diffusion prior and retrieval all live in the token space of the open_clip
``ViT-bigG-14`` / ``laion2b_s39b_b160k`` visual tower: the tokens after ``ln_post`` (applied to all
tokens), class token dropped, no projection -> (B, 256, 1664). Only the visual tower is built; the
text tower is never allocated. Weights come from a local open_clip checkpoint file only: nothing is
downloaded.

open_clip 3.3.0 on the default path (``pool_type="tok"``, no attentional pooler,
``final_ln_after_pool=False``) returns exactly ``ln_post(all tokens)[:, 1:]`` with
``output_tokens=True``; :func:`_check_token_path` refuses towers configured otherwise, and the tests
compare the output with the tokens computed by hand from the tower's pieces.
"""

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from kornia.geometry.transform import resize
from open_clip.model import _build_vision_tower
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from rtdecode.checkpoint_io import check_state, expected_shapes, read_safetensors, torch_load
from rtdecode.errors import CheckpointError, ModelError

Scaling = Literal["mindeye2", "conventional"]
SCALINGS = ("mindeye2", "conventional")

# OpenAI CLIP normalisation, the one open_clip's ViT-bigG-14 laion2b checkpoint was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISUAL_PREFIX = "visual."
DEFAULT_BATCH_SIZE = 16
_WEIGHTS_HINT = "it must be a local open_clip ViT-bigG-14 laion2b_s39b_b160k weight file"


class ImageEmbedder:
    """Images in [0, 1] -> open_clip visual tokens (B, n_tokens, width), MindEye2's CLIP targets.

    Build with :meth:`from_weights` (a local open_clip checkpoint) or :meth:`from_config` (random
    weights, for tests and benchmarks). The tower is frozen and in eval mode.
    """

    def __init__(
        self,
        tower: VisionTransformer,
        *,
        scaling: Scaling = "mindeye2",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if scaling not in SCALINGS:
            raise ModelError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ModelError(f"batch_size must be a positive integer, got {batch_size!r}")
        _check_token_path(tower)
        self.tower = tower.eval().requires_grad_(False)
        self.scaling: Scaling = scaling
        self.batch_size = batch_size
        first = next(tower.parameters())
        self.device, self.dtype = first.device, first.dtype

    @classmethod
    def from_config(
        cls,
        model_config: Mapping[str, Any],
        *,
        scaling: Scaling = "mindeye2",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> "ImageEmbedder":
        """A tower with open_clip's random initialisation (``device="meta"`` allocates nothing)."""
        with torch.device(device):
            tower = _build_tower(model_config, dtype)
        return cls(tower.to(dtype=dtype), scaling=scaling, batch_size=batch_size)

    @classmethod
    def from_weights(
        cls,
        weights: Path | str,
        *,
        model_name: str = "ViT-bigG-14",
        model_config: Mapping[str, Any] | None = None,
        scaling: Scaling = "mindeye2",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> "ImageEmbedder":
        """The tower of ``model_name`` (or ``model_config``) with the ``visual.*`` weights of a local file.

        ``weights`` is an open_clip checkpoint: ``.safetensors``, or a torch state dict (``.bin``,
        ``.pt``, ...), optionally under a ``state_dict`` entry and/or with a ``module.`` prefix. Other
        (text tower) entries are ignored and never read from a safetensors file. The tower is built
        on the meta device and takes the loaded tensors directly, so memory holds one copy.
        """
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"weights file {str(path)!r} not found; {_WEIGHTS_HINT} (nothing is downloaded)")
        config = model_config if model_config is not None else _named_config(model_name)
        with torch.device("meta"):
            tower = _build_tower(config, dtype)
        state = _read_visual_state(path)
        _check_keys(path, tower, state)
        tower.load_state_dict(state, strict=True, assign=True)
        return cls(tower.to(device=device, dtype=dtype), scaling=scaling, batch_size=batch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the images are resized to, 224x224 for ViT-bigG-14."""
        return tuple(self.tower.image_size)

    @property
    def n_tokens(self) -> int:
        """Patch tokens per image (class token dropped): 256 for ViT-bigG-14."""
        grid_h, grid_w = self.tower.grid_size
        return grid_h * grid_w

    @property
    def width(self) -> int:
        """Features per token: 1664 for ViT-bigG-14."""
        return self.tower.class_embedding.shape[0]

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize, rescale and normalise (B, 3, H, W) images in [0, 1] as MindEye2 does (spec §2.4).

        1. kornia ``resize`` to :attr:`image_size` (bicubic, align_corners, antialias); images already
           at that size pass unchanged, as kornia 0.7.1 (MindEye2's version) returns them.
        2. ``scaling="mindeye2"``: x = (x + 1) / 2, the public quirk: MindEye2 feeds [0, 1] images to
           an embedder written for [-1, 1], so the tower sees [0.5, 1]. Its checkpoints were trained
           on these targets. ``"conventional"`` skips this step.
        3. OpenAI CLIP mean/std normalisation.
        """
        _check_images(images)
        return self._normalised(images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, n_tokens, width) tokens, in chunks of ``batch_size``."""
        _check_images(images)
        chunks = [self._tokens(self._normalised(chunk)) for chunk in _chunks(images, self.batch_size)]
        return torch.cat(chunks)

    def _normalised(self, images: Tensor) -> Tensor:
        """:meth:`preprocess` without the input checks."""
        x = images.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            x = resize(x, self.image_size, interpolation="bicubic", align_corners=True, antialias=True)
        if self.scaling == "mindeye2":
            x = (x + 1.0) / 2.0
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _tokens(self, pixels: Tensor) -> Tensor:
        """open_clip's ``output_tokens`` forward: ln_post(all tokens)[:, 1:] on the default path."""
        _, tokens = self.tower(pixels.to(self.dtype))
        return tokens


def _named_config(model_name: str) -> dict[str, Any]:
    """open_clip's bundled config of ``model_name`` (no network), or a ModelError."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ModelError(f"model_name {model_name!r} is not an open_clip model config; try 'ViT-bigG-14'")
    return config


def _build_tower(model_config: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    """Only the visual tower of an open_clip model config, with ``output_tokens`` on.

    The config is open_clip's format (``embed_dim``, ``vision_cfg``, optional ``quick_gelu``). For a
    half-precision ``dtype`` open_clip's fp32 LayerNorm is used, as ``create_model`` would do.
    """
    vision_cfg = model_config.get("vision_cfg")
    if not isinstance(vision_cfg, Mapping) or "embed_dim" not in model_config:
        raise ModelError(
            f"model_config must be an open_clip model config with 'embed_dim' and a 'vision_cfg' mapping; "
            f"got keys {sorted(model_config)}"
        )
    cast_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else None
    try:
        return _build_vision_tower(
            model_config["embed_dim"],
            {**vision_cfg, "output_tokens": True},
            quick_gelu=bool(model_config.get("quick_gelu", False)),
            cast_dtype=cast_dtype,
        )
    except TypeError as error:
        raise ModelError(
            f"model_config vision_cfg {dict(vision_cfg)} is not a valid open_clip vision config: {error}"
        ) from error


def _check_token_path(tower: nn.Module) -> None:
    """Refuse towers whose ``output_tokens`` are not ln_post(all tokens)[:, 1:] (spec §2.4)."""
    if not isinstance(tower, VisionTransformer):
        raise ModelError(f"the visual tower must be an open_clip VisionTransformer, got {type(tower).__name__}")
    if tower.attn_pool is not None or tower.final_ln_after_pool or tower.pool_type != "tok":
        raise ModelError(
            "the vision config must use the default token path (pool_type='tok', attentional_pool=False, "
            f"final_ln_after_pool=False); got pool_type={tower.pool_type!r}, "
            f"attentional_pool={tower.attn_pool is not None}, final_ln_after_pool={tower.final_ln_after_pool}"
        )


def _read_visual_state(path: Path) -> dict[str, Tensor]:
    """The ``visual.*`` entries of an open_clip checkpoint, prefix removed."""
    if path.suffix == ".safetensors":
        state = read_safetensors(path, keep=lambda key: _strip_visual(key) is not None)
    else:
        state = torch_load(path)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return {name: value for key, value in state.items() if (name := _strip_visual(key)) is not None}


def _strip_visual(key: str) -> str | None:
    """``[module.]visual.<name>`` -> ``<name>``; None for any other (text tower, logit_scale) key."""
    key = key.removeprefix("module.")
    return key[len(VISUAL_PREFIX) :] if key.startswith(VISUAL_PREFIX) else None


def _check_keys(path: Path, tower: nn.Module, state: Mapping[str, Any]) -> None:
    """CheckpointError listing missing, unexpected and mis-shaped visual tensors (prefix dropped), if any."""
    check_state(
        expected_shapes(tower), state, f"weights file {str(path)!r} (visual.* tensors)", hint=f"\n{_WEIGHTS_HINT}"
    )


def _check_images(images: Any) -> None:
    """(B, 3, H, W) floating-point images with finite values in [0, 1], or a ModelError."""
    if not isinstance(images, Tensor):
        raise ModelError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ModelError(f"images must have shape (B, 3, H, W) with B >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ModelError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.device.type == "meta":
        return
    low, high = images.min().item(), images.max().item()
    if not (0.0 <= low and high <= 1.0):  # also catches NaN
        raise ModelError(f"images must have values in [0, 1], found range [{low:.4g}, {high:.4g}]")


def _chunks(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]
