"""The onnxruntime backend: an exported ONNX graph (external data beside it is found by onnxruntime).

On a CUDA device the session uses onnxruntime's CUDA provider when this onnxruntime has it (the ``onnxruntime-gpu``
build), otherwise the CPU provider. Inputs and outputs pass through host memory (numpy): a few megabytes per call at
the serving shapes, small beside a UNet evaluation; TensorRT is the backend for the lowest latency.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rtdecode.engines.engine import Engine
from rtdecode.engines.signature import Signature
from rtdecode.errors import EngineError

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class OnnxRuntimeEngine(Engine):
    """An ONNX file run by onnxruntime; the graph's inputs and outputs must match ``signature`` by name."""

    backend = "onnxruntime"

    def __init__(self, signature: Signature, path: Path, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", n_threads: int | None = None) -> None:  # fmt: skip
        super().__init__(signature, precision=precision, device=device)
        self.path = Path(path)
        self.session = _session(self.path, self.device, n_threads)
        self.provider = self.session.get_providers()[0]
        _check_names(self.session, signature, self.path)

    def describe(self) -> str:
        return f"{self.stage}: onnxruntime {self.precision} ({self.provider}) from {self.path.name}"

    def _run(self, inputs: list[Tensor]) -> Sequence[Tensor]:
        feeds = {name: value.cpu().numpy() for name, value in zip(self.signature.input_names, inputs, strict=True)}
        try:
            outputs = self.session.run(list(self.signature.outputs), feeds)
        except Exception as err:  # onnxruntime's own exception types
            shapes = {name: tuple(value.shape) for name, value in feeds.items()}
            raise EngineError(
                f"{self.path}: onnxruntime failed on stage {self.stage!r} with inputs {shapes}: {err}"
            ) from None
        return [torch.from_numpy(np.ascontiguousarray(output)) for output in outputs]


def _session(path: Path, device: torch.device, n_threads: int | None):
    try:
        import onnxruntime
    except ImportError:
        raise EngineError(
            "the onnxruntime backend needs onnxruntime: pip install 'rtdecode[onnx]' (onnxruntime-gpu on a GPU host)"
        ) from None
    if not path.is_file():
        raise EngineError(f"ONNX engine {path} not found; build it with: rtdecode build-engines --backend onnx")
    providers = [CPU_PROVIDER]
    if device.type == "cuda" and CUDA_PROVIDER in onnxruntime.get_available_providers():
        providers = [(CUDA_PROVIDER, {"device_id": device.index or 0}), CPU_PROVIDER]
    elif device.type == "cuda":
        log.warning(
            "%s: this onnxruntime has no CUDA provider, so the graph runs on the CPU, not %s "
            "(pip install onnxruntime-gpu, or build TensorRT engines)", path.name, device,
        )  # fmt: skip
    options = onnxruntime.SessionOptions()
    if n_threads is not None:
        options.intra_op_num_threads = n_threads
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid graphs
        raise EngineError(
            f"{path}: onnxruntime cannot load this graph ({err}); rebuild it with rtdecode build-engines"
        ) from None


def _check_names(session, signature: Signature, path: Path) -> None:
    inputs = tuple(item.name for item in session.get_inputs())
    outputs = tuple(item.name for item in session.get_outputs())
    if set(inputs) != set(signature.input_names) or not set(signature.outputs) <= set(outputs):
        raise EngineError(
            f"{path}: graph inputs {list(inputs)} / outputs {list(outputs)} do not match stage "
            f"{signature.stage!r} ({list(signature.input_names)} / {list(signature.outputs)}); rebuild the engines"
        )
