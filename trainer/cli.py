"""``rtdecode pretrain`` and ``rtdecode bench train`` (rtdecode's CLI loads these lazily)."""

import logging
import os
from pathlib import Path

import click

DEFAULT_BENCH_CONFIG = Path(__file__).parent / "configs" / "smoke.toml"


def _run_logging(out_dir: Path) -> None:
    """The main process logs to ``OUT/train.log`` and the console at INFO; the others only warnings.

    The process rank comes from ``RANK`` (set by ``accelerate launch`` and torchrun), read before accelerate
    starts so every record of the run is routed.
    """
    root = logging.getLogger()
    if int(os.environ.get("RANK", "0")) != 0:
        root.setLevel(logging.WARNING)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


@click.command("pretrain")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Experiment config (TOML), e.g. trainer/configs/smoke.toml, light.toml, paper.toml.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value: --set recipe.epochs=3")
@click.option(
    "--until-epoch",
    type=click.IntRange(min=1),
    help="Stop after this epoch (1-based), checkpointed; the schedule stays the whole run's. Run again to go on.",
)
@click.option("--no-resume", is_flag=True, help="Refuse to continue from run.out_dir's checkpoints (fresh runs only).")
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Check the data and build the target caches (targets.cache_dir), then stop: run it once, as one process, "
    "before a multi-GPU launch.",
)
def pretrain(
    config_path: Path, overrides: tuple[str, ...], until_epoch: int | None, no_resume: bool, prepare_only: bool
) -> None:
    """Multi-subject MindEye2 pretraining with the paper's recipe (spec §3).

    BiMixCo for the first third of the epochs, then SoftCLIP (annealed temperature); prior loss x30,
    low-level L1 x0.5 when an SD-VAE folder is configured; AdamW 3e-4 with OneCycle; accelerate mixed
    precision. Per epoch: 300-way retrieval top-1 both ways (30 draws) in metrics.jsonl and the log.
    A run resumes from its newest checkpoint in run.out_dir by default; the trained model is written
    to run.out_dir/model as an rtdecode model bundle.

    \b
    Examples:
      rtdecode pretrain --config trainer/configs/smoke.toml          # CPU, synthetic world, minutes
      rtdecode pretrain --config trainer/configs/paper.toml --until-epoch 10
      accelerate launch --config_file trainer/configs/accelerate/zero2.yaml \\
          $(which rtdecode) pretrain --config trainer/configs/paper.toml   # multi-GPU, DeepSpeed ZeRO-2
    """
    from rtdecode.errors import TrainError
    from trainer import checkpoints
    from trainer.config import load_train_config
    from trainer.loop import Pretrainer

    config = load_train_config(config_path, overrides)
    out_dir = Path(config.run.out_dir)
    if no_resume and checkpoints.latest(out_dir) is not None:
        raise TrainError(f"run.out_dir {out_dir} already has checkpoints; resume (drop --no-resume) or choose another")
    _run_logging(out_dir)
    trainer = Pretrainer(config, resume=not no_resume, prepare_only=prepare_only)
    if prepare_only:
        click.echo(f"data and targets ready: {trainer.dataset.description}; {trainer.tokens.describe()}")
        return
    records = trainer.fit(until_epoch)
    if records and trainer.is_main:
        click.echo(records[-1].summary())
        click.echo(f"run folder: {out_dir} (metrics.jsonl, train.log, checkpoints/, model/)")


@click.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_BENCH_CONFIG,
    show_default=True,
    help="Experiment config to time (its data and targets are built as for a run).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--steps", "n_steps", type=click.IntRange(min=1), default=20, show_default=True, help="Steps timed.")
@click.option(
    "--warmup", "n_warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed steps first."
)
def bench_train(config_path: Path, overrides: tuple[str, ...], n_steps: int, n_warmup: int) -> None:
    """Training throughput: samples/s and step time of the config's recipe; peak memory.

    Times whole optimiser steps (targets from the config's cache or computed, forward, losses, backward,
    AdamW, OneCycle) after warm-up steps, in a scratch folder (a synthetic world is built there too).
    A GPU run at the paper's size: --config trainer/configs/paper.toml (its data and weights must be there).
    """
    from trainer.bench import run_bench
    from trainer.config import load_train_config

    config = load_train_config(config_path, overrides)
    click.echo(run_bench(config, n_steps=n_steps, n_warmup=n_warmup))
