"""Open the engine a manifest entry names, with the backend it was built for."""

from pathlib import Path

import torch

from rtdecode.engines.engine import Engine
from rtdecode.engines.manifest import EngineEntry
from rtdecode.errors import EngineError


def open_engine(entry: EngineEntry, folder: Path, device: str | torch.device) -> Engine:
    """The engine of ``entry`` (its file relative to ``folder``) on ``device``; EngineError when it cannot open."""
    path = Path(folder) / entry.file
    if entry.backend == "onnxruntime":
        from rtdecode.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(entry.signature(), path, device=device, precision=entry.precision)
    if entry.backend == "tensorrt":
        from rtdecode.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(entry.signature(), path, precision=entry.precision, device=device)
    raise EngineError(f"{path}: unknown engine backend {entry.backend!r}")
