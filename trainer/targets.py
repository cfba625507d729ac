"""The frozen training targets of every stimulus image: bigG tokens and SD-VAE latents (spec §3.3).

* :class:`TokenTargets`: ``clip_target``, the open_clip ViT-bigG/14 tokens of an image, (256, 1664), made by
  :class:`~rtdecode.models.embedder.ImageEmbedder` (which reproduces MindEye2's [0, 1] -> [0.5, 1] input quirk,
  spec §2.4). The prior and the contrastive loss are trained against them.
* :class:`LatentTargets`: the low-level L1 target, ``0.18215 * VAE.encode(2 * img - 1).latent_dist.mode()`` of the
  SD 1.x VAE, (4, 28, 28) for MindEye2's 224 px images.

Both are frozen functions of the image, so they can be computed on the fly, or once into a cache: a memory-mapped
float16 ``NAME.npy`` (73k bigG tokens are 62 GB in fp16: memory-mapping reads only the rows a batch needs) with a
``NAME.json`` sidecar holding the key it was built for. A cache is trusted only when its key matches and its
sidecar says ``"complete": true``, which is written after every row is on disk; anything else is rebuilt, so an
interrupted build or a cache of other images or other weights is never used. The VICRegL teacher targets of the
low-level contrastive term are not computed here.
"""

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch import Tensor
from tqdm import tqdm

from rtdecode.errors import TrainDataError, TrainError
from rtdecode.file_integrity import write_atomically
from rtdecode.generate.low_level import SD1_LATENT_SCALE
from rtdecode.models.embedder import ImageEmbedder
from trainer.data.source import ImageStore, checked_image_indices

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_DTYPE = np.float16
_IMPORT_VAE_COMMAND = "rtdecode model import-low-level-vae sd_image_var_autoenc.pth --out DIR"


class _ArrayCache:
    """A float16 (n_images, *shape) array in ``path`` (``NAME.npy``) and its key in ``NAME.json``.

    The build writes ``NAME.partial.npy`` and moves it into place only when every row is filled and flushed, then
    writes the sidecar with ``"complete": true``; a reader holding the old file keeps its own copy meanwhile.
    """

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        if path.suffix != ".npy":
            raise TrainError(f"cache_path must name a .npy file, got {str(path)!r}")
        self.path = path
        self.sidecar = path.with_suffix(".json")
        self.key = json.loads(json.dumps(key))  # as it reads back from the sidecar (tuples -> lists)
        self.shape = (int(key["n_images"]), *(int(n) for n in key["shape"]))

    def stale_reason(self) -> str | None:
        """Why the files on disk cannot be used (None when they can)."""
        if not self.sidecar.is_file():
            return f"its sidecar {self.sidecar} is missing"
        try:
            stored = json.loads(self.sidecar.read_text())
        except (OSError, ValueError) as error:
            return f"its sidecar {self.sidecar} is unreadable ({error})"
        if not isinstance(stored, dict):
            return f"its sidecar {self.sidecar} does not hold a JSON object"
        differing = [name for name in self.key if stored.get(name) != self.key[name]]
        if differing:
            name = differing[0]
            return f"its {name!r} is {stored.get(name)!r}, this run needs {self.key[name]!r}"
        if stored.get("complete") is not True:
            return "it is incomplete (its build was interrupted)"
        return self._data_problem()

    def _data_problem(self) -> str | None:
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as error:
            return f"its data file is unreadable ({error})"
        if array.shape != self.shape or array.dtype != CACHE_DTYPE:
            return f"its data file holds {array.dtype} {array.shape}, not {np.dtype(CACHE_DTYPE)} {self.shape}"
        return None

    def open(self) -> np.ndarray:
        """The cached array, memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r")

    def build(self, compute: Callable[[np.ndarray], Tensor], *, batch_size: int, progress: bool, label: str) -> None:
        """Fill every row with ``compute(indices)``, ``batch_size`` images at a time, then mark the cache complete."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_sidecar(complete=False)
        partial = self.path.with_name(self.path.stem + ".partial.npy")
        array = open_memmap(partial, mode="w+", dtype=CACHE_DTYPE, shape=self.shape)
        with tqdm(total=self.shape[0], desc=label, unit="img", disable=not progress) as bar:
            for indices in _batches(self.shape[0], batch_size):
                array[indices[0] : indices[-1] + 1] = compute(indices).numpy().astype(CACHE_DTYPE)
                bar.update(indices.size)
        array.flush()
        del array
        os.replace(partial, self.path)
        self._write_sidecar(complete=True)

    def _write_sidecar(self, *, complete: bool) -> None:
        write_atomically(self.sidecar, json.dumps({**self.key, "complete": complete}, indent=1) + "\n")


class _FrozenTargets:
    """What :class:`TokenTargets` and :class:`LatentTargets` share: indices -> float32 rows, cached or not.

    Subclasses give :attr:`shape`, a ``label`` for logs and :meth:`_targets`, the frozen network on a batch.
    """

    label = "targets"

    def __init__(
        self,
        images: ImageStore,
        *,
        key: dict[str, Any],
        cache_path: Path | None,
        batch_size: int,
        progress: bool,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise TrainError(f"batch_size must be a positive integer, got {batch_size!r}")
        if images.n_images < 1:
            raise TrainDataError(f"image store {images.identity!r} holds no images")
        self.images = images
        self.batch_size = batch_size
        self.progress = progress
        full_key = {"format_version": CACHE_FORMAT_VERSION, "images": images.identity, "n_images": images.n_images}
        self._cache = None if cache_path is None else _ArrayCache(Path(cache_path), {**full_key, **key})
        self._array: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _targets(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) float32 images in [0, 1] -> (n, *shape) targets (any device)."""
        raise NotImplementedError

    @property
    def cache_path(self) -> Path | None:
        return None if self._cache is None else self._cache.path

    def prepare(self) -> None:
        """With a cache: build it unless a complete one with this key exists (no-op without a cache)."""
        if self._cache is None:
            return
        self._array = None
        reason = self._cache.stale_reason()
        if reason is None:
            log.info("%s: using cache %s", self.label, self._cache.path)
        elif not self._cache.sidecar.exists() and not self._cache.path.exists():
            log.info("%s: building cache %s (%d images)", self.label, self._cache.path, self.images.n_images)
        else:
            log.warning("%s: rebuilding cache %s because %s", self.label, self._cache.path, reason)
        if reason is not None:
            self._cache.build(self._compute_rows, batch_size=self.batch_size, progress=self.progress, label=self.label)
        self._array = self._cache.open()

    def get(self, indices: np.ndarray) -> Tensor:
        """Targets of images ``indices`` (any order, repeats allowed): CPU float32 (len, *shape).

        With a cache the rows come from it (built first if :meth:`prepare` was not called), else they are computed.
        """
        indices = self._checked_indices(indices)
        if self._cache is None:
            return self._compute_rows(indices)
        if self._array is None:
            self.prepare()
        return torch.from_numpy(self._array[indices].astype(np.float32))

    def describe(self) -> str:
        """One line for the run log: what the targets are and where they come from."""
        size = "x".join(str(n) for n in self.shape)
        where = "computed on the fly" if self._cache is None else f"from cache {self._cache.path}"
        return f"{self.label} {size} {where} ({self.images.n_images} images)"

    @torch.no_grad()
    def _compute_rows(self, indices: np.ndarray) -> Tensor:
        """Run the network on each distinct image once, ``batch_size`` at a time; CPU float32 (len, *shape)."""
        unique, inverse = np.unique(indices, return_inverse=True)
        chunks = [
            self._targets(self._read(unique[batch])).float().cpu() for batch in _batches(unique.size, self.batch_size)
        ]
        rows = torch.cat(chunks) if chunks else torch.zeros((0, *self.shape))
        return rows[torch.from_numpy(inverse.reshape(-1))]

    def _read(self, indices: np.ndarray) -> Tensor:
        """Images ``indices`` of the store as a float32 tensor, checked: (n, 3, H, W) in [0, 1]."""
        images = np.asarray(self.images.read(indices), dtype=np.float32)
        if images.ndim != 4 or images.shape[0] != indices.size or images.shape[1] != 3:
            raise TrainDataError(
                f"image store {self.images.identity!r} returned {images.shape} for {indices.size} images; "
                "expected (n, 3, H, W)"
            )
        if not (images.min() >= 0.0 and images.max() <= 1.0):  # also catches NaN
            raise TrainDataError(
                f"image store {self.images.identity!r} returned values in [{images.min():.4g}, {images.max():.4g}]; "
                "images must lie in [0, 1]"
            )
        return torch.from_numpy(images)

    def _checked_indices(self, indices: np.ndarray) -> np.ndarray:
        where = f"targets of image store {self.images.identity!r}"
        return checked_image_indices(indices, self.images.n_images, where, shape_error=TrainError)


class TokenTargets(_FrozenTargets):
    """Tokens of every image of an ImageStore: on the fly, or from a memory-mapped fp16 cache file.

    ``embedder_identity`` names the weights (e.g. the weight file's sha256, or a random config and seed); it and
    the embedder's scaling key the cache, with the store's identity.
    """

    label = "bigG tokens"

    def __init__(
        self,
        embedder: ImageEmbedder,
        images: ImageStore,
        *,
        embedder_identity: str,
        cache_path: Path | None = None,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        _check_identity("embedder_identity", embedder_identity)
        self.embedder = embedder
        key = {"kind": "tokens", "embedder": embedder_identity, "scaling": embedder.scaling, "shape": self.shape}
        super().__init__(images, key=key, cache_path=cache_path, batch_size=batch_size, progress=progress)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_tokens, width): (256, 1664) for ViT-bigG-14."""
        return (self.embedder.n_tokens, self.embedder.width)

    def _targets(self, images: Tensor) -> Tensor:
        return self.embedder.embed(images)


class LatentTargets(_FrozenTargets):
    """SD-VAE latents (x 0.18215) of every image: same on-the-fly / cache behaviour as TokenTargets.

    Images are resized (bilinear, antialiased) to ``latent_size`` times the VAE's downsampling factor (8 for the
    SD 1.x VAE: 28 -> 224 px), mapped to [-1, 1] and encoded; the latent is the posterior mode times 0.18215, the
    SD 1.x scale MindEye2 hard-codes (spec §3.3), whatever the VAE config's ``scaling_factor`` says.
    """

    label = f"SD-VAE latents (x{SD1_LATENT_SCALE})"

    def __init__(
        self,
        vae: "AutoencoderKL",
        images: ImageStore,
        *,
        latent_size: int,
        vae_identity: str,
        cache_path: Path | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        if not isinstance(latent_size, int) or isinstance(latent_size, bool) or latent_size < 1:
            raise TrainError(f"latent_size must be a positive integer, got {latent_size!r}")
        _check_identity("vae_identity", vae_identity)
        self.vae = vae.eval().requires_grad_(False)
        self.latent_size = latent_size
        self.size_px = latent_size * 2 ** (len(vae.config.block_out_channels) - 1)
        key = {
            "kind": "vae_latents",
            "vae": vae_identity,
            "scaling": SD1_LATENT_SCALE,
            "size_px": self.size_px,
            "shape": self.shape,
        }
        super().__init__(images, key=key, cache_path=cache_path, batch_size=batch_size, progress=progress)

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        images: ImageStore,
        *,
        latent_size: int,
        cache_path: Path | None = None,
        vae_identity: str | None = None,
        batch_size: int = 16,
        progress: bool = True,
        device: str | torch.device = "cpu",
    ) -> "LatentTargets":
        """The float32 VAE of a local diffusers folder (as ``rtdecode model import-low-level-vae`` writes it).

        Without ``vae_identity`` the folder is identified by its path and its files' sizes and modification times
        (cheap; a copied folder rebuilds the cache, a changed one always does).
        """
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise TrainDataError(
                f"low-level VAE folder {str(folder)!r} not found (no {folder / 'config.json'}); "
                f"make it with: {_IMPORT_VAE_COMMAND}"
            )
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, dtype=torch.float32).to(device)
        identity = vae_identity if vae_identity is not None else _folder_fingerprint(folder)
        return cls(
            vae,
            images,
            latent_size=latent_size,
            vae_identity=identity,
            cache_path=cache_path,
            batch_size=batch_size,
            progress=progress,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(4, latent_size, latent_size)."""
        return (int(self.vae.config.latent_channels), self.latent_size, self.latent_size)

    def _targets(self, images: Tensor) -> Tensor:
        first = next(self.vae.parameters())
        x = images.to(device=first.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != (self.size_px, self.size_px):
            x = F.interpolate(
                x, size=(self.size_px, self.size_px), mode="bilinear", align_corners=False, antialias=True
            )
        latents = self.vae.encode((2.0 * x - 1.0).to(first.dtype)).latent_dist.mode()
        if tuple(latents.shape[1:]) != self.shape:
            raise TrainError(
                f"the VAE made latents {tuple(latents.shape[1:])} from {self.size_px} px, not {self.shape}"
            )
        return SD1_LATENT_SCALE * latents


def _check_identity(name: str, identity: Any) -> None:
    if not isinstance(identity, str) or not identity.strip():
        raise TrainError(f"{name} must be a non-empty string naming the weights, got {identity!r}")


def _folder_fingerprint(folder: Path) -> str:
    """The folder's absolute path and each file's name, size and mtime: changes when the weights do."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    parts = [f"{path.relative_to(folder)}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files]
    return f"{folder.resolve()}|{';'.join(parts)}"


def _batches(n_items: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive index ranges 0..n_items in chunks of at most ``batch_size``."""
    for start in range(0, n_items, batch_size):
        yield np.arange(start, min(start + batch_size, n_items))
