"""``rtdecode pretrain`` and ``rtdecode bench train`` (rtdecode's CLI loads these lazily)."""

import logging
from pathlib import Path

import click

DEFAULT_BENCH_CONFIG = Path(__file__).parent / "configs" / "smoke.toml"


def _file_log(out_dir: Path) -> None:
    """Also log to ``OUT/train.log``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(min(logging.getLogger().level or logging.INFO, logging.INFO))


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
def pretrain(config_path: Path, overrides: tuple[str, ...], until_epoch: int | None, no_resume: bool) -> None:
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
    _file_log(out_dir)
    trainer = Pretrainer(config, resume=not no_resume)
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
@click.option("--steps", "n_steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--warmup", "n_warmup", type=click.IntRange(min=0), default=3, show_default=True)
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
