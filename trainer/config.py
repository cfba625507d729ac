"""Pretraining experiment configs: one TOML file per experiment (``trainer/configs/NAME.toml``).

Every number of the paper's recipe (spec §3) is a default here, so a config names only what differs.
``rtdecode pretrain --config FILE --set recipe.epochs=3`` overrides one value, as ``rtdecode``'s own
config does. Relative paths are read from the current directory.
"""

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from rtdecode.config import ConfigSources, UserPath, apply_overrides, describe_validation, read_toml
from rtdecode.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunConfig(_Section):
    """Where the run writes, and how it runs."""

    name: str = Field("pretrain", description="Experiment name (logs, provenance).")
    out_dir: UserPath = Field(Path("runs/pretrain"), description="Checkpoints, metrics.jsonl, train.log, model/.")
    seed: int = Field(42, description="Seeds the model init, the data order and the mixing draws.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="accelerate's mixed precision (the paper: fp16; bf16 on recent GPUs)."
    )
    cpu: bool = Field(False, description="Train on the CPU even when a GPU is present.")
    checkpoint_every_epochs: int = Field(5, ge=1, description="Also checkpoints after the last epoch.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    progress: bool = Field(True, description="Show a progress bar.")

    @pydantic.model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> "RunConfig":
        if self.cpu and self.mixed_precision == "fp16":
            raise ValueError("mixed_precision 'fp16' needs a GPU; with cpu = true use 'bf16' or 'no'")
        return self


class WorldSettings(_Section):
    """The synthetic world (``rtdecode.sim.world.WorldConfig``): only used when ``data.source = "synthetic"``."""

    seed: int = 0
    n_subjects: int = Field(8, ge=1, le=26)
    n_features: int = Field(16, ge=1, description="Dimensions of the latent every image is made from.")
    n_test_images: int = Field(60, ge=2)
    n_train_images: int = Field(240, ge=1)
    n_test_reps: int = Field(3, ge=1, description="Presentations of each shared test image per subject.")
    image_size_px: int = Field(32, ge=8)


class DataConfig(_Section):
    """Which data to train on."""

    source: Literal["nsd", "sessions", "synthetic"] = Field(
        "nsd", description="nsd: the published files; sessions: session bundles; synthetic: the synthetic world."
    )
    root: UserPath | None = Field(
        None,
        description="nsd: the folder of the published files; sessions: a folder of session bundles; "
        "synthetic: where the world's session bundles are written (and reused).",
    )
    subjects: tuple[str, ...] | None = Field(
        None, description="Subjects in ridge-layer order (nsd: required, e.g. subj02..subj08). Default: all found."
    )
    n_sessions: int | None = Field(None, ge=1, description="nsd: train sessions per subject (default: all).")
    test_split: Literal["new_test", "test"] = Field("new_test", description="nsd: which published test split.")
    image_size_px: int = Field(224, ge=8, description="sessions: images are resized to this square size.")
    world: WorldSettings = Field(default_factory=WorldSettings)


class ModelSettings(_Section):
    """The MindEye2 to train: a preset from ``rtdecode.models.config`` and its changes."""

    preset: Literal["paper", "light", "tiny"] = Field("paper", description="paper: H 4096; light: H 1024; tiny.")
    hidden_dim: int | None = Field(None, ge=1, description="Override the preset's hidden size.")
    low_level: bool | None = Field(None, description="Override whether the low-level (blurry) branch exists.")
    init_from: UserPath | None = Field(
        None,
        description="Fine-tune: an rtdecode model bundle to start from. Its architecture and weights are used "
        "(preset and hidden_dim are ignored) with fresh ridge weights for this data's subjects (spec §4).",
    )


class TargetsConfig(_Section):
    """The frozen models that make the training targets."""

    embedder: UserPath | None = Field(
        None, description="open_clip ViT-bigG-14 weights (laion2b_s39b_b160k), local file; required unless random."
    )
    embedder_model: str = Field("ViT-bigG-14", description="open_clip model name of the embedder's weights.")
    embedder_random: dict[str, Any] | None = Field(
        None,
        description="A random-weight open_clip tower instead (tests and smoke runs): an open_clip model config "
        "({embed_dim, vision_cfg}) with an optional 'seed'.",
    )
    scaling: Literal["mindeye2", "conventional"] = Field("mindeye2", description="Embedder input scaling (§2.4).")
    cache_dir: UserPath | None = Field(
        None, description="Cache the targets as memory-mapped fp16 files here (NSD bigG tokens: ~62 GB)."
    )
    low_level_vae: UserPath | None = Field(
        None, description="SD-1 VAE folder (rtdecode model import-low-level-vae): enables the low-level L1 loss."
    )


class RecipeConfig(_Section):
    """The training recipe; defaults are the paper's multi-subject pretraining (spec §3.1, §3.3, §3.4)."""

    epochs: int = Field(150, ge=1)
    batch_per_subject: int = Field(6, ge=2, description="Samples per subject per step (42 / 7 subjects).")
    samples_per_epoch: int | None = Field(
        None, ge=1, description="Per epoch, all processes together. Default: the largest subject's train trials."
    )
    max_lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    mixup_pct: float = Field(0.33, ge=0, le=1, description="BiMixCo for the first int(mixup_pct*epochs) epochs.")
    prior_scale: float = Field(30.0, ge=0)
    clip_scale: float = Field(1.0, ge=0)
    blur_scale: float = Field(0.5, ge=0)
    final_div_factor: float = Field(1000.0, gt=0)
    warmup_epochs: float = Field(2.0, gt=0, description="OneCycle pct_start = warmup_epochs / epochs.")


class ValidationConfig(_Section):
    """Per-epoch retrieval on the test split (spec §6)."""

    n_way: int = Field(300, ge=2)
    n_draws: int = Field(30, ge=1)
    every_epochs: int = Field(1, ge=1)


class TrainConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSettings = Field(default_factory=ModelSettings)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)


def load_train_config(path: Path, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Read, override and validate an experiment config; every bad key is named with its source."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist (see trainer/configs/ for examples)")
    raw = read_toml(path)
    keys = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(describe_validation(error, ConfigSources(file=path, overridden_keys=keys))) from None


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON-ready values (for run.json and checkpoints)."""
    return config.model_dump(mode="json")
