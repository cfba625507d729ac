"""``rtdecode build-engines``: one subject's GPU stages exported to ONNX, built into TensorRT engines (or kept as
ONNX for onnxruntime), with fixtures for ``verify-engines`` and a manifest the daemon checks before use.

Layout of ``<bundle>/engines/``::

    manifest.json                 platform, and per stage: file, backend, precision, shapes, weights SHA-256
    onnx/<stage>.onnx (+ .data)   the exported graph (fp32, dynamic batch; weights beside it above 2 GB)
    <stage>.<precision>.plan      TensorRT engine (static serving shapes)
    fixtures/<stage>.npz          inputs and torch's float32 outputs at the serving shape
    timing.cache                  TensorRT's timing cache, reused by later builds on this GPU
    weights-sha256.json           stat-keyed cache of weight-file hashes
"""

import dataclasses
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deploy.onnx_export import EXTERNAL_DATA_BYTES, export_onnx
from rtdecode.config import Config
from rtdecode.engines.manifest import MANIFEST_FILE, EngineEntry, EngineManifest, current_platform
from rtdecode.engines.weights import WeightHasher
from rtdecode.errors import EngineError
from rtdecode.file_integrity import write_atomically
from rtdecode.stage_engines import ENGINES_DIR, VERIFY_REPORT_FILE
from rtdecode.stage_graphs import STAGES, StageGraph, decoder_graphs
from rtdecode.store import Store

BACKENDS = {"tensorrt": "tensorrt", "onnx": "onnxruntime"}  # --backend -> the manifest's backend
TIMING_CACHE_FILE = "timing.cache"
FIXTURES_DIR = "fixtures"
FP32_VAE_STAGES = ("unclip_vae_decode", "refiner_vae_encode", "refiner_vae_decode", "low_level_decode")
ONNX_DIR = "onnx"


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    backend: str = "tensorrt"  # tensorrt | onnx
    precision: str = "fp16"
    stages: tuple[str, ...] = ()  # empty: every stage the configured decoder runs
    device: str = "cuda"
    external_data_bytes: int = EXTERNAL_DATA_BYTES
    workspace_bytes: int | None = None
    optimization_level: int = 3

    def check(self) -> None:
        """EngineError for a combination no build can honour, before minutes of export."""
        if self.backend not in BACKENDS:
            raise EngineError(f"--backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "onnx" and self.precision != "fp32":
            raise EngineError(
                f"--backend onnx runs the exported fp32 graph with onnxruntime; --precision {self.precision} is a "
                "TensorRT precision (use --backend tensorrt, or --precision fp32)"
            )
        if self.precision == "fp8":
            from deploy.tensorrt_build import FP8_REFUSAL

            raise EngineError(FP8_REFUSAL)
        if self.backend == "tensorrt":
            from rtdecode.engines.tensorrt_engine import import_tensorrt

            import_tensorrt("--backend tensorrt")  # before minutes of export, not after
            if not self.device.startswith("cuda"):
                raise EngineError(f"--backend tensorrt builds for a CUDA GPU; --device is {self.device!r}")
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise EngineError(f"unknown --stage {unknown}; the stages are {list(STAGES)}")


def load_graphs(config: Config, subject: str, device: str) -> list[StageGraph]:
    """The stage graphs of the decoder ``config`` describes for ``subject``, its weights in float32 on ``device``."""
    from rtdecode.generate.pipeline import ImagePipeline
    from rtdecode.models.bundle import load_bundle
    from rtdecode.subject_bundle import load_subject_bundle

    bundle = load_subject_bundle(Store(config.home).bundle_dir(subject), load_model=False)
    model = load_bundle(bundle.path("model"), device=device, dtype="fp32").model
    pipeline = None
    if config.serve.reconstruct:
        fp32 = config.generate.model_copy(update={"dtype": "fp32", "device": device})
        pipeline = ImagePipeline.from_config(config.models, fp32)
    return decoder_graphs(model, subject, pipeline, config.models, bundle.path("model"))


def build_engines(
    config: Config, subject: str, settings: BuildSettings, *, echo: Callable[[str], None] = print
) -> EngineManifest:
    """Export (and build) every chosen stage; write the manifest. Stages not chosen keep their earlier entries."""
    settings.check()
    folder = Store(config.home).bundle_dir(subject) / ENGINES_DIR
    earlier = _earlier_entries(folder, subject, echo)  # read first: a bad manifest must not waste a long build
    graphs = [
        g for g in load_graphs(config, subject, settings.device) if not settings.stages or g.stage in settings.stages
    ]
    if not graphs:
        raise EngineError(
            f"none of the stages {list(settings.stages)} is part of this decoder (check [serve]/[generate])"
        )
    hasher = WeightHasher(folder)
    entries = []
    for number, graph in enumerate(graphs, start=1):
        started_s = time.perf_counter()
        entries.append(_build_stage(graph, folder, settings, hasher))
        echo(f"[{number}/{len(graphs)}] {graph.stage}: {entries[-1].file} ({time.perf_counter() - started_s:.1f} s)")
    hasher.save()
    stages = {entry.stage for entry in entries}
    kept = [entry for entry in earlier if entry.stage not in stages]
    manifest = EngineManifest(subject, current_platform(), tuple(kept + entries))
    forget_verdicts(folder, stages)
    manifest.write(folder)
    return manifest


def forget_verdicts(folder: Path, stages: set[str]) -> None:
    """Drop ``verify-engines``' verdicts on ``stages`` (their engines are replaced); keep the others' verdicts.
    An unreadable report, or one left with no verdict, is removed."""
    path = folder / VERIFY_REPORT_FILE
    if not path.is_file():
        return
    try:
        report = json.loads(path.read_text())
        report["checks"] = [check for check in report["checks"] if check["stage"] not in stages]
    except (OSError, ValueError, KeyError, TypeError):
        report = {"checks": []}
    if report["checks"]:
        write_atomically(path, json.dumps(report, indent=1) + "\n")
    else:
        path.unlink(missing_ok=True)


def stage_precision(stage: str, precision: str) -> str:
    """The precision a stage is built at: as asked, except that fp16 keeps the VAEs in fp32, as the torch path
    does (the SDXL VAE overflows fp16; bf16 has fp32's range)."""
    return "fp32" if precision == "fp16" and stage in FP32_VAE_STAGES else precision


def _build_stage(graph: StageGraph, folder: Path, settings: BuildSettings, hasher: WeightHasher) -> EngineEntry:
    precision = stage_precision(graph.stage, settings.precision)
    onnx_path = export_onnx(
        graph, folder / ONNX_DIR / f"{graph.stage}.onnx", external_data_bytes=settings.external_data_bytes
    )
    save_fixture(graph, folder / FIXTURES_DIR / f"{graph.stage}.npz")
    engine_file = onnx_path.relative_to(folder)
    if settings.backend == "tensorrt":
        from deploy.tensorrt_build import build_tensorrt_engine

        plan = build_tensorrt_engine(
            onnx_path,
            folder / f"{graph.stage}.{precision}.plan",
            precision=precision,
            input_shapes=graph.input_shapes,
            timing_cache_path=folder / TIMING_CACHE_FILE,
            workspace_bytes=settings.workspace_bytes,
            optimization_level=settings.optimization_level,
        )
        engine_file = plan.relative_to(folder)
    return EngineEntry(
        graph.stage,
        str(engine_file),
        BACKENDS[settings.backend],
        precision,
        graph.input_shapes,
        graph.outputs,
        hasher.files_sha256(graph.weight_files),
    )


def save_fixture(graph: StageGraph, path: Path) -> Path:
    """The example inputs and torch's float32 outputs, for ``verify-engines``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the reference is true fp32
    try:
        outputs = graph.run_torch()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    arrays = {f"input/{name}": value.numpy() for name, value in graph.inputs.items()}
    arrays |= {f"output/{name}": value.cpu().numpy() for name, value in zip(graph.outputs, outputs, strict=True)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_atomically(path, buffer.getbuffer())


def load_fixture(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(inputs, outputs) by name, as saved by :func:`save_fixture`."""
    if not path.is_file():
        raise EngineError(f"fixture {path} not found; rebuild with rtdecode build-engines")
    with np.load(path) as arrays:
        inputs = {k.removeprefix("input/"): torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("input/")}
        outputs = {
            k.removeprefix("output/"): torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("output/")
        }
    return inputs, outputs


def _earlier_entries(folder: Path, subject: str, echo: Callable[[str], None]) -> list[EngineEntry]:
    """Entries of an earlier build to keep beside the stages built now: same subject, same platform (a manifest
    records one platform). Anything else is dropped, saying so."""
    if not (folder / MANIFEST_FILE).is_file():
        return []
    try:
        earlier = EngineManifest.read(folder)
    except EngineError as err:
        echo(f"the earlier manifest is not readable and is replaced: {err}")
        return []
    if earlier.subject != subject or earlier.platform != current_platform():
        if earlier.engines:
            echo(f"earlier engines ({', '.join(e.stage for e in earlier.engines)}) were built for another subject or "
                 "platform; the new manifest lists only the stages built now")  # fmt: skip
        return []
    return list(earlier.engines)
