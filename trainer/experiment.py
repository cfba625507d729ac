"""From an experiment config to the things a run needs: the dataset, the frozen targets, the model config.

Everything here runs before the first step, so bad data, a missing weight file or a size mismatch is
reported in seconds with the file or key named.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch

from rtdecode.errors import TrainError
from rtdecode.models import config as model_configs
from rtdecode.models.embedder import ImageEmbedder
from trainer.config import TrainConfig
from trainer.data.source import Dataset

log = logging.getLogger(__name__)

PUBLISHED_TOKENS = (256, 1664)


def load_dataset(config: TrainConfig, *, progress: bool = True) -> Dataset:
    """The dataset the config names (the synthetic world is written as session bundles first, then read)."""
    data = config.data
    if data.root is None:
        raise TrainError(f"data.root must name a folder for data.source = {data.source!r}")
    if data.source == "nsd":
        from trainer.data.nsd import load_nsd

        if not data.subjects:
            raise TrainError("data.subjects must list the NSD subjects to train on (e.g. subj02 ... subj08)")
        return load_nsd(data.root, data.subjects, n_sessions=data.n_sessions, test_split=data.test_split)
    from trainer.data.sessions import find_sessions, load_sessions

    if data.source == "synthetic":
        from trainer.data.synthetic import write_synthetic_sessions

        write_synthetic_sessions(data.world, data.root, progress=progress)
        return load_sessions(find_sessions(data.root), subjects=data.subjects, image_size_px=data.world.image_size_px)
    return load_sessions(find_sessions(data.root), subjects=data.subjects, image_size_px=data.image_size_px)


def load_embedder(config: TrainConfig, device: torch.device) -> tuple[ImageEmbedder, str]:
    """The frozen image embedder and its identity string (what a target cache is keyed on)."""
    targets = config.targets
    if targets.embedder_random is not None:
        settings = dict(targets.embedder_random)
        seed = int(settings.pop("seed", 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            embedder = ImageEmbedder.from_config(settings, scaling=targets.scaling, device=device)
        identity = f"random:{json.dumps(settings, sort_keys=True)}:seed={seed}:{targets.scaling}"
        log.warning("targets: a RANDOM-weight open_clip tower (embedder_random); for tests and smoke runs only")
        return embedder, identity
    if targets.embedder is None:
        raise TrainError(
            "targets.embedder must name the local open_clip ViT-bigG-14 weight file "
            "(open_clip_pytorch_model.bin of laion2b_s39b_b160k); nothing is downloaded"
        )
    path = Path(targets.embedder)
    embedder = ImageEmbedder.from_weights(
        path, model_name=targets.embedder_model, scaling=targets.scaling, device=device
    )
    stat = path.stat()
    return embedder, f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{targets.embedder_model}:{targets.scaling}"


def model_config(config: TrainConfig, dataset: Dataset, token_shape: tuple[int, int]) -> model_configs.MindEye2Config:
    """The preset for the dataset's subjects, sized to the embedder's tokens, with the config's changes."""
    settings = config.model
    if settings.init_from is not None:
        return _fine_tune_config(config, dataset, token_shape)
    preset = {"paper": model_configs.paper, "light": model_configs.light, "tiny": model_configs.tiny}[settings.preset]
    base = preset(dataset.names, dataset.n_voxels)
    backbone, prior = base.backbone, base.prior
    if settings.preset == "tiny":
        n_tokens, width = token_shape
        heads = 2 if width % 2 == 0 else 1
        backbone = dataclasses.replace(backbone, clip_tokens=n_tokens, clip_dim=width)
        prior = dataclasses.replace(prior, dim=width, n_tokens=n_tokens, heads=heads, dim_head=width // heads)
    elif tuple(token_shape) != PUBLISHED_TOKENS:
        raise TrainError(
            f"model.preset {settings.preset!r} needs bigG tokens {PUBLISHED_TOKENS}; the embedder gives "
            f"{tuple(token_shape)}. Use the ViT-bigG-14 weights, or model.preset = 'tiny'"
        )
    if settings.hidden_dim is not None:
        backbone = dataclasses.replace(backbone, hidden_dim=settings.hidden_dim)
    wanted = backbone.low_level is not None if settings.low_level is None else settings.low_level
    low = None
    if wanted and _low_level_trainable(config):
        low = backbone.low_level or model_configs.LowLevelConfig()
    return dataclasses.replace(base, backbone=dataclasses.replace(backbone, low_level=low), prior=prior)


def _fine_tune_config(
    config: TrainConfig, dataset: Dataset, token_shape: tuple[int, int]
) -> model_configs.MindEye2Config:
    """The starting bundle's architecture for this data's subjects; its low-level branch kept only if trainable."""
    from trainer.finetune import fine_tune_config

    tuned = fine_tune_config(config.model.init_from, dataset.names, dataset.n_voxels, token_shape)
    low = tuned.backbone.low_level
    if low is not None and (config.model.low_level is False or not _low_level_trainable(config)):
        low = None
    return dataclasses.replace(tuned, backbone=dataclasses.replace(tuned.backbone, low_level=low))


def _low_level_trainable(config: TrainConfig) -> bool:
    """Whether the low-level branch can learn: it needs SD-VAE latents and a nonzero blur_scale.

    Without them the branch is left out of the model (as the public ``--no-blurry_recon``), rather than
    saved untrained, and the log says why.
    """
    if config.targets.low_level_vae is None:
        log.warning("low-level loss: off: targets.low_level_vae is not set; the model has no low-level branch")
        return False
    if config.recipe.blur_scale == 0:
        log.warning("low-level loss: off: recipe.blur_scale is 0; the model has no low-level branch")
        return False
    return True
