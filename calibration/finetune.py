"""The fine-tune: the trainer's loop (paper recipe, spec §4) on the calibration session's training bundle.

From a pretrained multi-subject bundle (``model.init_from``: its architecture, every non-ridge weight, a new
ridge layer for the subject, nothing frozen) or from scratch (``calibrate.scratch_preset``). Validation after
every epoch is the held-out retrieval; checkpoints make an interrupted fine-tune resume where it stopped.
"""

import json
import logging
from pathlib import Path

from rtdecode.config import Config
from rtdecode.errors import CalibrationError
from trainer.config import (
    DataConfig,
    ModelSettings,
    RecipeConfig,
    RunConfig,
    TargetsConfig,
    TrainConfig,
    ValidationConfig,
)

log = logging.getLogger(__name__)

SCRATCH = "scratch"


def starting_bundle(config: Config) -> Path | None:
    """The pretrained bundle to fine-tune from (None: from scratch); CalibrationError if none is configured."""
    settings = config.calibrate
    if settings.from_scratch:
        return None
    bundle = settings.pretrained or config.models.mindeye2_dir
    if bundle is None:
        raise CalibrationError(
            "no pretrained model to fine-tune: set calibrate.pretrained (or models.mindeye2_dir) to a model bundle "
            "(rtdecode pretrain, rtdecode model import-mindeye2), or pass --from-scratch"
        )
    from rtdecode.errors import CheckpointError
    from rtdecode.models.bundle import read_bundle_config

    try:
        read_bundle_config(Path(bundle))
    except CheckpointError as error:
        raise CalibrationError(f"calibrate.pretrained: {error}") from None
    return Path(bundle)


def check_embedder(config: Config) -> None:
    """Targets need the bigG weights (or, for tests and demos, a random tower)."""
    if config.calibrate.embedder_random is None and config.models.image_embedder is None:
        raise CalibrationError(
            "models.image_embedder must name the local open_clip ViT-bigG-14 weight file (the training targets "
            "are its image tokens); nothing is downloaded"
        )
    if config.models.image_embedder is not None and not Path(config.models.image_embedder).is_file():
        raise CalibrationError(f"models.image_embedder {config.models.image_embedder} does not exist")


def train_config(
    config: Config, subject: str, session_root: Path, out_dir: Path, init: Path | None, n_trials: int, progress: bool
) -> TrainConfig:
    """The trainer's config for this fine-tune (validated like a TOML one).

    Samples per epoch default to the session's trial count, held-out trials included, as the public fine-tune
    counts them (spec §4: 750 / 24 = 31 steps per epoch for one NSD session).
    """
    settings = config.calibrate
    return TrainConfig(
        run=RunConfig(
            name=f"calibrate-{subject}",
            out_dir=out_dir,
            seed=settings.seed,
            mixed_precision=settings.mixed_precision,
            cpu=settings.cpu,
            checkpoint_every_epochs=settings.checkpoint_every_epochs,
            progress=progress,
        ),
        data=DataConfig(
            source="sessions", root=session_root, subjects=(subject,), image_size_px=settings.image_size_px
        ),
        model=ModelSettings(
            preset=settings.scratch_preset,
            hidden_dim=None if init is not None else settings.scratch_hidden_dim,
            init_from=init,
        ),
        targets=TargetsConfig(
            embedder=config.models.image_embedder,
            embedder_random=settings.embedder_random,
            scaling=config.models.image_embedder_scaling,
            cache_dir=out_dir.parent / "targets",
            low_level_vae=config.models.low_level_vae_dir,
        ),
        recipe=RecipeConfig(
            epochs=settings.epochs,
            batch_per_subject=settings.batch_size,
            samples_per_epoch=settings.samples_per_epoch or n_trials,
            max_lr=settings.max_lr,
            mixup_pct=settings.mixup_pct,
        ),
        validation=ValidationConfig(n_way=settings.n_way, n_draws=settings.n_draws, every_epochs=1),
    )


def fine_tune(train: TrainConfig) -> tuple[Path, list[dict]]:
    """Train (resuming from the newest checkpoint in ``run.out_dir``); return the model folder and every epoch's
    metrics (a resumed run's earlier epochs included)."""
    from rtdecode.errors import TrainError
    from trainer import checkpoints
    from trainer.loop import METRICS_FILE, MODEL_DIR, Pretrainer

    try:
        trainer = Pretrainer(train)
    except TrainError as error:
        hint = ""
        if checkpoints.latest(Path(train.run.out_dir)) is not None:
            hint = f" (if a checkpoint in {train.run.out_dir} is refused, move that folder away and run again)"
        raise CalibrationError(f"fine-tune: {error}{hint}") from None
    trainer.fit()
    metrics_path = Path(train.run.out_dir) / METRICS_FILE
    epochs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return Path(train.run.out_dir) / MODEL_DIR, epochs
