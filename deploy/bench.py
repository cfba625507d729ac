"""``rtdecode bench engines``: per-stage latency of torch eager, torch compiled (inductor), and the subject's built
engines (onnxruntime, TensorRT), on the same inputs at the serving shape. Prints figures; judges nothing."""

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rtdecode.bench.model import time_calls
from rtdecode.engines.engine import Engine, TorchEngine
from rtdecode.engines.loading import open_engine
from rtdecode.engines.manifest import MANIFEST_FILE, EngineEntry, EngineManifest
from rtdecode.errors import EngineError
from rtdecode.stage_graphs import StageGraph


@dataclasses.dataclass
class StageTiming:
    stage: str
    backend: str
    latency_ms: np.ndarray | None
    note: str = ""


def bench_engines(
    graphs: list[StageGraph], folder: Path, *, device: str, torch_modes: tuple[str, ...], n_warmup: int, n_reps: int,
    echo: Callable[[str], None] = print,
) -> list[StageTiming]:  # fmt: skip
    """Time every stage of ``graphs`` with each torch mode and with its built engine in ``folder`` (if any)."""
    entries = {}
    if (Path(folder) / MANIFEST_FILE).is_file():
        entries = {entry.stage: entry for entry in EngineManifest.read(Path(folder)).engines}
    timings = []
    for graph in graphs:
        for name, make in _candidates(graph, entries.get(graph.stage), Path(folder), device, torch_modes):
            timings.append(_timed(graph, name, make, torch.device(device), n_warmup, n_reps))
            echo(format_timing(timings[-1]))
    return timings


def _candidates(graph: StageGraph, entry: EngineEntry | None, folder: Path, device: str,
                torch_modes: tuple[str, ...]) -> list[tuple[str, Callable[[], Engine]]]:  # fmt: skip
    """(name, engine maker) per backend to time: each torch mode, then the built engine."""
    candidates = [
        (f"torch {mode}", functools.partial(TorchEngine, graph.signature(), graph.module, mode=mode))
        for mode in torch_modes
    ]
    if entry is not None:
        candidates.append((f"{entry.backend} {entry.precision}", functools.partial(open_engine, entry, folder, device)))
    return candidates


def _timed(graph: StageGraph, name: str, make: Callable[[], Engine], device: torch.device, n_warmup: int,
           n_reps: int) -> StageTiming:  # fmt: skip
    try:
        engine = make()
    except EngineError as err:
        return StageTiming(graph.stage, name, None, f"not run: {err}")
    inputs = [value.to(device) for value in graph.inputs.values()]
    return StageTiming(graph.stage, name, time_calls(lambda: engine(*inputs), device, n_warmup, n_reps))


def format_timing(timing: StageTiming) -> str:
    if timing.latency_ms is None:
        return f"{timing.stage:<20} {timing.backend:<18} {timing.note}"
    median, p95 = np.median(timing.latency_ms), np.percentile(timing.latency_ms, 95)
    return f"{timing.stage:<20} {timing.backend:<18} {median:10.2f} ms {p95:10.2f} ms  (n={len(timing.latency_ms)})"


HEADER = f"{'stage':<20} {'backend':<18} {'median':>13} {'p95':>13}"
