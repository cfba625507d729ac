"""``rtdecode bench train``: whole training steps of a config, timed (a benchmark, not a test).

The run's real code path (:class:`trainer.loop.Pretrainer`) in a scratch output folder; reported: median
and p95 step time, samples/s, and peak memory (CUDA allocator peak on a GPU, process peak RSS on a CPU).
"""

import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.recipe import batch_plan


def run_bench(config: TrainConfig, *, n_steps: int, n_warmup: int) -> str:
    """Time ``n_steps`` steps after ``n_warmup``; return the printed report."""
    from trainer.loop import Pretrainer

    with tempfile.TemporaryDirectory(prefix="rtdecode-bench-train-") as scratch:
        run = config.run.model_copy(update={"out_dir": Path(scratch) / "run", "progress": False})
        data = config.data
        if data.source == "synthetic":  # a scratch world: the bench leaves nothing behind
            data = data.model_copy(update={"root": Path(scratch) / "world"})
        trainer = Pretrainer(config.model_copy(update={"run": run, "data": data}), resume=False)
        timings_s = _time_steps(trainer, n_steps, n_warmup)
    batch = config.recipe.batch_per_subject * len(trainer.dataset.subjects)
    return _report(trainer, config, timings_s, batch)


def _time_steps(trainer, n_steps: int, n_warmup: int) -> np.ndarray:
    """Seconds per optimiser step (the first epoch's: BiMixCo when the recipe starts with it)."""
    device = trainer.accelerator.device
    plan = batch_plan(trainer.dataset, trainer.config.recipe, seed=0, epoch=0, process=0, n_steps=n_warmup + n_steps)
    timings_s = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, positions in enumerate(plan):
        _sync(device)
        started = time.perf_counter()
        trainer.train_step(0, step, positions)
        _sync(device)
        if step >= n_warmup:
            timings_s.append(time.perf_counter() - started)
    return np.asarray(timings_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (allocator)"
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return f"peak RSS {rss_gib:.2f} GiB (whole process)"


def _report(trainer, config: TrainConfig, timings_s: np.ndarray, batch: int) -> str:
    device = trainer.accelerator.device
    model = trainer.accelerator.unwrap_model(trainer.model)
    n_params = sum(p.numel() for p in model.parameters())
    median_ms, p95_ms = np.median(timings_s) * 1e3, np.percentile(timings_s, 95) * 1e3
    threads = f", torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs" if device.type == "cpu" else ""
    first = trainer.schedule[0]
    lines = [
        f"rtdecode bench train: {config.run.name} ({config.model.preset}, hidden "
        f"{trainer.model_config.backbone.hidden_dim}, {n_params / 1e6:.1f} M parameters), "
        f"{len(trainer.dataset.subjects)} subjects x {config.recipe.batch_per_subject} = batch {batch}",
        f"device {device}{threads}, precision {config.run.mixed_precision}, low-level loss "
        f"{'on' if trainer.latents is not None else 'off'}, contrastive {first.kind}; {len(timings_s)} steps timed",
        f"{'step median':>12} {'step p95':>10} {'samples/s':>10}",
        f"{median_ms:>9.1f} ms {p95_ms:>7.1f} ms {batch / np.median(timings_s):>10.1f}",
        _peak_memory(device),
    ]
    return "\n".join(lines)
