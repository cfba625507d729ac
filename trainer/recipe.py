"""The paper's optimisation recipe (spec §3.3, §3.4): loss schedule, AdamW groups, OneCycle, batch plans."""

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from rtdecode.errors import TrainError
from trainer.config import RecipeConfig
from trainer.data.source import Dataset
from trainer.losses import MIXCO_TEMPERATURE, softclip_temperatures

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # the public code's name filter (§3.4)


@dataclasses.dataclass(frozen=True)
class EpochLoss:
    """Which contrastive loss an epoch uses, and its temperature."""

    kind: str  # "bimixco" or "softclip"
    temperature: float


def loss_schedule(recipe: RecipeConfig) -> list[EpochLoss]:
    """BiMixCo (tau 0.006) for epochs < int(mixup_pct * epochs), then SoftCLIP with the annealed tau."""
    n_mixco = int(recipe.mixup_pct * recipe.epochs)
    temps = softclip_temperatures(recipe.epochs - n_mixco)
    return [EpochLoss("bimixco", MIXCO_TEMPERATURE)] * n_mixco + [EpochLoss("softclip", t) for t in temps]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the public code: ridge all decayed; backbone and prior decayed except bias/LayerNorm names.

    Names are matched as substrings, as the public filter does: dalle2-style ``.g`` gains and LayerNorms named
    by index (``mixer_blocks1.0.0.weight``) are decayed too.
    """
    ridge, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("ridge."):
            ridge.append(param)
        elif any(part in name for part in NO_DECAY):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": ridge, "weight_decay": weight_decay},
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, recipe: RecipeConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=recipe.max_lr)


def check_schedule(recipe: RecipeConfig, steps_per_epoch: int) -> int:
    """The run's optimiser steps, or a TrainError when OneCycle cannot span them (fewer than 3)."""
    total_steps = recipe.epochs * steps_per_epoch
    if total_steps < 3:
        raise TrainError(
            f"OneCycle needs at least 3 optimiser steps, got recipe.epochs x steps per epoch = "
            f"{recipe.epochs} x {steps_per_epoch} = {total_steps}: raise recipe.epochs or recipe.samples_per_epoch"
        )
    return total_steps


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: RecipeConfig, steps_per_epoch: int):
    """OneCycle over the whole run, stepped once per optimiser step (torch defaults: div 25, cycled beta1).

    The warm-up is ``warmup_epochs`` (2 in the paper: pct_start 2/150) rounded to whole steps, at least 2 and
    leaving the anneal at least one: torch divides by zero for a one-step warm-up (short runs on small data).
    """
    total_steps = check_schedule(recipe, steps_per_epoch)
    warmup_steps = min(max(2, round(recipe.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.max_lr,
        total_steps=total_steps,
        pct_start=warmup_steps / total_steps,
        final_div_factor=recipe.final_div_factor,
    )


def steps_per_epoch(dataset: Dataset, recipe: RecipeConfig, n_processes: int = 1) -> int:
    """Iterations per epoch and process: samples / (per-subject batch x subjects), as the public loop (§3.2).

    Samples per epoch default to the largest subject's train trials (750 x sessions for NSD) and are split
    across processes.
    """
    samples = recipe.samples_per_epoch or max(s.n_train for s in dataset.subjects)
    per_step = recipe.batch_per_subject * len(dataset.subjects)
    return max(1, samples // n_processes // per_step)


def batch_plan(
    dataset: Dataset,
    recipe: RecipeConfig,
    *,
    seed: int,
    epoch: int,
    process: int,
    n_steps: int,
    n_processes: int = 1,
) -> Iterator[list[np.ndarray]]:
    """Per step, each subject's train positions for this process: ``batch_per_subject`` of every subject.

    Each subject's trials are reshuffled every pass, one permutation per (seed, epoch, subject, pass) shared by
    all processes; process ``p`` takes every ``n_processes``-th position from ``p``, so together the processes
    cover a pass once. The order depends only on those numbers, so a run resumed at an epoch boundary sees
    the same batches.
    """
    small = [s.name for s in dataset.subjects if s.n_train < n_processes]
    if small:
        raise TrainError(f"subject(s) {small} have fewer train trials than the {n_processes} processes")
    streams = [
        _positions(subject.n_train, seed, epoch, index, process, n_processes)
        for index, subject in enumerate(dataset.subjects)
    ]
    for _ in range(n_steps):
        yield [_take(stream, recipe.batch_per_subject) for stream in streams]


def step_rng(seed: int, epoch: int, process: int, step: int) -> np.random.Generator:
    """The generator of one step's mixing draws."""
    return np.random.default_rng([seed, epoch, process, step, 1])


def _positions(n_items: int, seed: int, epoch: int, subject: int, process: int, n_processes: int) -> Iterator[int]:
    for n_pass in itertools.count():
        order = np.random.default_rng([seed, epoch, subject, n_pass]).permutation(n_items)
        yield from order[process::n_processes].tolist()


def _take(stream: Iterator[int], count: int) -> np.ndarray:
    return np.fromiter((next(stream) for _ in range(count)), dtype=np.int64, count=count)
