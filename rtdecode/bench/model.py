"""``rtdecode bench model``: MindEye2 latency (embed, 20-step prior) and the memory of loading a bundle.

The model is built at real size with random weights (sizes need no weights): hidden 1024 (the light
model) by default, hidden 4096 (the paper's) on request. For each (dtype, mode) it times, at batch 1:

* embed: ridge + backbone + retrieval head (+ low-level branch when the model has one);
* prior: the public 20-step DDIM sampler (19 network calls) on the backbone tokens.

Modes: ``eager``; ``compile`` (``torch.compile``, inductor); ``cudagraphs`` (``torch.compile`` with
``mode="reduce-overhead"``, CUDA only). Loading memory is measured in a fresh process: peak RSS while
``load_bundle`` runs and after the first forward touched every weight, against the file's size.
"""

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rtdecode.models.bundle import WEIGHTS_FILE, load_bundle, save_model_bundle
from rtdecode.models.config import BackboneConfig, LowLevelConfig, MindEye2Config
from rtdecode.models.info import parameter_counts
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.precision import DTYPES


@dataclasses.dataclass
class LatencyResult:
    dtype: str
    mode: str
    embed_ms: np.ndarray
    prior_ms: np.ndarray
    n_steps: int


@dataclasses.dataclass
class LoadResult:
    weights_gb: float
    baseline_mb: float
    peak_load_mb: float
    after_forward_mb: float


def bench_config(hidden_dim: int, n_voxels: int, low_level: bool) -> MindEye2Config:
    backbone = BackboneConfig(hidden_dim=hidden_dim, low_level=LowLevelConfig() if low_level else None)
    return MindEye2Config(subjects=("subj01",), n_voxels=(n_voxels,), backbone=backbone)


def build_model(config: MindEye2Config, device: str, dtype: str) -> MindEye2:
    """Random weights at real size, initialised on the target device (fast on a GPU)."""
    with torch.device(device):
        model = MindEye2(config)
    return model.to(DTYPES[dtype]).eval()


def time_latency(
    model: MindEye2, *, dtype: str, mode: str, n_steps: int, n_embed: int, n_prior: int, n_warmup: int
) -> LatencyResult:
    """Latencies of one (dtype, mode); ``model`` is compiled in place for the compiled modes (build a fresh one)."""
    device = next(model.parameters()).device
    voxels = torch.randn(1, model.config.n_voxels[0], device=device, dtype=DTYPES[dtype])
    subject = model.config.subjects[0]
    _compile_in_place(model, mode)

    def embed() -> torch.Tensor:
        _mark_step(mode)
        return model.embed(voxels, subject).backbone

    with torch.no_grad():
        tokens = embed().clone()  # CUDA-graph outputs are overwritten by the next replay
        embed_ms = time_calls(embed, device, n_warmup, n_embed)

        def sample() -> torch.Tensor:
            _mark_step(mode)
            return model.sample_prior(tokens, n_steps=n_steps)

        prior_ms = time_calls(sample, device, min(n_warmup, 1), n_prior)
    return LatencyResult(dtype, mode, embed_ms, prior_ms, n_steps)


def _compile_in_place(model: MindEye2, mode: str) -> None:
    """``Module.compile`` on the ridge, backbone and prior network, so every call the sampler makes is compiled."""
    if mode == "eager":
        return
    options = {"compile": {}, "cudagraphs": {"mode": "reduce-overhead"}}[mode]
    for module in (model.ridge, model.backbone, model.diffusion_prior.net):
        module.compile(**options)


def _mark_step(mode: str) -> None:
    if mode == "cudagraphs":
        torch.compiler.cudagraph_mark_step_begin()


def time_calls(run: Callable[[], object], device: torch.device, n_warmup: int, n_reps: int) -> np.ndarray:
    """Milliseconds of each of `n_reps` calls after `n_warmup` untimed ones, the device synchronised."""
    for _ in range(n_warmup):
        run()
    _sync(device)
    times_ms = []
    for _ in range(n_reps):
        start = time.perf_counter()
        run()
        _sync(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return np.array(times_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_load(config: MindEye2Config) -> LoadResult:
    """Write a random bundle of ``config`` (fp32) and load it in a fresh process, tracking its RSS."""
    with tempfile.TemporaryDirectory(prefix="rtdecode-bench-") as folder:
        torch.manual_seed(0)
        save_model_bundle(Path(folder), MindEye2(config), provenance={"source_kind": "random"})
        weights_gb = (Path(folder) / WEIGHTS_FILE).stat().st_size / 1e9
        output = subprocess.run(
            [sys.executable, "-m", "rtdecode.bench.model", folder], capture_output=True, text=True, check=True
        ).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    return LoadResult(weights_gb=weights_gb, **figures)


def _load_in_this_process(folder: Path) -> dict[str, float]:
    """Run by :func:`measure_load` in a child: peak RSS (MB) before, during and after loading + one forward."""
    baseline_mb = _peak_rss_mb()
    bundle = load_bundle(folder)
    peak_load_mb = _peak_rss_mb()
    with torch.no_grad():
        tokens = bundle.model.embed(torch.zeros(1, bundle.config.n_voxels[0]), bundle.config.subjects[0]).backbone
        bundle.model.diffusion_prior.net(tokens, torch.zeros(1), tokens)
    return {"baseline_mb": baseline_mb, "peak_load_mb": peak_load_mb, "after_forward_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: that survives fork+exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def bench_model(
    hidden_dim: int,
    n_voxels: int,
    low_level: bool,
    device: str,
    dtypes: Sequence[str],
    modes: Sequence[str],
    *,
    n_steps: int = 20,
    n_embed: int = 20,
    n_prior: int = 3,
    measure_loading: bool = True,
) -> tuple[list[LatencyResult], LoadResult | None]:
    config = bench_config(hidden_dim, n_voxels, low_level)
    results = []
    for dtype in dtypes:
        for mode in modes:
            print(f"timing {dtype} {mode} ...", file=sys.stderr)
            torch.manual_seed(0)
            model = build_model(config, device, dtype)  # fresh per mode: compiling is done in place
            n_warmup = 3 if mode == "eager" else 5
            results.append(
                time_latency(
                    model, dtype=dtype, mode=mode, n_steps=n_steps, n_embed=n_embed, n_prior=n_prior, n_warmup=n_warmup
                )
            )
            del model
            torch.compiler.reset()
    load = None
    if measure_loading:
        print("measuring load memory ...", file=sys.stderr)
        load = measure_load(config)
    return results, load


def format_results(
    results: Sequence[LatencyResult], load: LoadResult | None, config: MindEye2Config, device: str
) -> str:
    n_parameters = parameter_counts(config)["total"]
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    low = "with" if config.backbone.low_level else "without"
    lines = [
        f"MindEye2 hidden {config.backbone.hidden_dim}, {config.n_voxels[0]} voxels, {low} low-level branch, "
        f"{n_parameters / 1e6:.0f} M parameters, batch 1, device {name}",
        f"{'dtype':6} {'mode':11} {'embed median':>13} {'embed p95':>10} {'prior median':>13} {'prior p95':>10}",
    ]
    for r in results:
        lines.append(
            f"{r.dtype:6} {r.mode:11} {np.median(r.embed_ms):10.2f} ms {np.percentile(r.embed_ms, 95):7.2f} ms "
            f"{np.median(r.prior_ms):10.1f} ms {np.percentile(r.prior_ms, 95):7.1f} ms"
        )
    if results:
        n_steps = results[0].n_steps
        if n_steps == config.prior.timesteps:  # the public sampler runs DDPM at the full schedule length
            lines.append(f"prior: {n_steps} DDPM steps = {n_steps} network calls")
        else:
            lines.append(f"prior: {n_steps} DDIM steps = {n_steps - 1} network calls")
    if load is not None:
        lines.append(
            f"loading the bundle ({load.weights_gb:.2f} GB fp32): peak RSS {load.peak_load_mb:,.0f} MB "
            f"(process baseline {load.baseline_mb:,.0f} MB; {load.peak_load_mb - load.baseline_mb:,.0f} MB for the "
            f"load); after one forward touched every weight: {load.after_forward_mb:,.0f} MB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_load_in_this_process(Path(sys.argv[1]))))
