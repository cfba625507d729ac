"""TensorRT backend: a serialized plan run at its static shapes, replayed as a CUDA graph.

A plan is built by ``rtdecode build-engines`` (:mod:`deploy.tensorrt_build`) for one TensorRT version and one GPU,
at the stage's static serving shapes. The engine owns one CUDA buffer per input and output for its whole life: a
call copies its inputs into the input buffers on the engine's own stream, runs the plan there, and returns float32
copies of the output buffers, so a later call never overwrites what an earlier one returned. Shapes and buffer
addresses never change, so after one plain warm-up run the plan's launch is captured once into a CUDA graph and
replayed on every later call (no per-kernel launch cost). ``tensorrt`` is imported only when an engine is opened or
built: this module imports on machines without it.
"""

import functools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rtdecode.engines.engine import Engine
from rtdecode.engines.manifest import PRECISIONS
from rtdecode.engines.signature import Signature
from rtdecode.errors import EngineError

log = logging.getLogger(__name__)

INSTALL_HINT = "install the tensorrt extra on the GPU host: pip install 'rtdecode[tensorrt]'"
REBUILD_HINT = "rebuild it with rtdecode build-engines on this host"
TENSORRT_ERRORS_KEPT = 32  # the logger keeps TensorRT's last errors so a failure can quote them
TORCH_DTYPES = {  # TensorRT DataType member name -> torch dtype, for the I/O buffers
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def import_tensorrt(purpose: str) -> ModuleType:
    """The ``tensorrt`` module; EngineError saying what needed it and how to install it when it does not import."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        raise EngineError(f"{purpose} needs TensorRT, which does not import here ({err}); {INSTALL_HINT}") from None
    return tensorrt


@functools.cache
def tensorrt_logger():
    """The process's one TensorRT logger. TensorRT keeps a single logger for every Builder and Runtime of a process,
    so all of rtdecode's share this one. It passes warnings and errors on to this module's log and keeps the last
    errors, which :meth:`errors_since` hands to the EngineError of the call that failed."""
    trt = import_tensorrt("the TensorRT logger")
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._errors: deque[str] = deque(maxlen=TENSORRT_ERRORS_KEPT)
            self.error_count = 0
            self._lock = threading.Lock()

        def log(self, level, message: str) -> None:  # called by TensorRT, from any thread
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                with self._lock:
                    self._errors.append(message)
                    self.error_count += 1
                log.error("TensorRT: %s", message)
            elif level == severity.WARNING:
                log.warning("TensorRT: %s", message)

        def errors_since(self, count: int) -> list[str]:
            """TensorRT's errors after the first ``count`` (read ``error_count`` before the call that may fail)."""
            with self._lock:
                new = min(self.error_count - count, len(self._errors))
                return list(self._errors)[len(self._errors) - new :] if new > 0 else []

    return _Logger()


def tensorrt_detail(errors: Sequence[str]) -> str:
    """TensorRT's own words for a failure, to append to an EngineError message ('' when it said nothing)."""
    return f" (TensorRT said: {' | '.join(errors)})" if errors else ""


class TensorRTEngine(Engine):
    """One stage's TensorRT plan, at the static shapes of ``signature``, on one CUDA device."""

    backend = "tensorrt"

    def __init__(self, signature: Signature, path: Path, *, precision: str, device: str | torch.device = "cuda",
                 cuda_graph: bool = True) -> None:  # fmt: skip
        self.path = Path(path)
        trt = import_tensorrt(f"TensorRT engine {self.path}")
        if precision not in PRECISIONS:
            raise EngineError(f"{self.path}: precision must be one of {list(PRECISIONS)}, got {precision!r}")
        super().__init__(signature, precision=precision, device=_cuda_device(device, self.path))
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._lock = threading.Lock()  # the buffers are shared by every call: one call at a time
        with torch.cuda.device(self.device):
            self._runtime, self._engine = _deserialize(trt, self.path)
            _check_io(trt, self._engine, signature, self.path)
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
            self._inputs = [self._input_buffer(spec.name, spec.shape) for spec in signature.inputs]
            self._outputs = [self._output_buffer(name) for name in signature.outputs]
            self._stream = torch.cuda.Stream(self.device)

    @property
    def uses_cuda_graph(self) -> bool:
        """Whether calls replay a captured CUDA graph (from the second call on, unless capture failed)."""
        return self._graph is not None

    def describe(self) -> str:
        graph = ", CUDA graph" if self.cuda_graph else ""
        return f"{self.stage}: tensorrt {self.precision} on {self.device} ({self.path.name}{graph})"

    def _input_buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The input's static buffer, its shape set once on the context and its address bound."""
        if not self._context.set_input_shape(name, shape):
            raise EngineError(f"{self.path}: TensorRT refused shape {shape} for input {name!r}; {REBUILD_HINT}")
        return self._bind(name, shape)

    def _output_buffer(self, name: str) -> Tensor:
        shape = tuple(int(size) for size in self._context.get_tensor_shape(name))
        if any(size < 0 for size in shape):
            raise EngineError(
                f"{self.path}: output {name!r} has shape {shape} once the inputs are set (a data-dependent size); "
                "the stage's graph must have static output shapes to run under TensorRT"
            )
        return self._bind(name, shape)

    def _bind(self, name: str, shape: tuple[int, ...]) -> Tensor:
        dtype = self._engine.get_tensor_dtype(name)
        torch_dtype = TORCH_DTYPES.get(dtype.name)
        if torch_dtype is None:
            raise EngineError(
                f"{self.path}: tensor {name!r} has TensorRT type {dtype.name}, which rtdecode cannot feed"
            )
        buffer = torch.empty(shape, dtype=torch_dtype, device=self.device)
        if not self._context.set_tensor_address(name, buffer.data_ptr()):
            raise EngineError(f"{self.path}: TensorRT refused the buffer address of tensor {name!r}")
        return buffer

    def _run(self, inputs: list[Tensor]) -> Sequence[Tensor]:
        """Copy in, run on the engine's stream, copy out; ordered after the caller's pending work and before the
        caller's next, so the caller uses the outputs on its own stream without synchronising."""
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)  # the inputs were made on the caller's stream
            with torch.cuda.stream(self._stream):
                for buffer, value in zip(self._inputs, inputs, strict=True):
                    buffer.copy_(value, non_blocking=True)
                    value.record_stream(self._stream)  # the caller may free it while the copy is pending
                self._execute()
                outputs = [buffer.to(torch.float32, copy=True) for buffer in self._outputs]
            caller.wait_stream(self._stream)
            for output in outputs:
                output.record_stream(caller)  # allocated on the engine's stream, used and freed on the caller's
        return outputs

    def _execute(self) -> None:
        """Run the plan once on the engine's stream: plainly on the first call, which also captures the graph that
        later calls replay (after a plain run: TensorRT's lazy set-up must not land in the capture)."""
        if self._graph is not None:
            self._graph.replay()
            return
        self._enqueue()
        if self.cuda_graph:
            self._graph = self._capture()

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """The plan's launch captured as a CUDA graph; None (and a warning, once: graphs are then off for this
        engine) when TensorRT cannot be captured, for example a plan with data-dependent control flow."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._enqueue()
        except (RuntimeError, EngineError) as err:
            self.cuda_graph = False
            log.warning("%s: CUDA graph capture failed (%s); stage %r runs without a graph", self.path, err, self.stage)
            return None
        return graph

    def _enqueue(self) -> None:
        trt_log = tensorrt_logger()
        before = trt_log.error_count
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise EngineError(
                f"{self.path}: TensorRT failed to run stage {self.stage!r}"
                f"{tensorrt_detail(trt_log.errors_since(before))}"
            )


def _cuda_device(device: str | torch.device, path: Path) -> torch.device:
    """``device`` as a CUDA device with an index; EngineError when it is not a CUDA device of this host."""
    device = torch.device(device)
    if device.type != "cuda":
        raise EngineError(f"{path}: a TensorRT engine runs on a CUDA device, got device {str(device)!r}; pass 'cuda'")
    if not torch.cuda.is_available():
        raise EngineError(
            f"{path}: a TensorRT engine needs a CUDA GPU and torch sees none here "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use the torch backend on this host"
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise EngineError(f"{path}: device cuda:{index} does not exist, this host has {torch.cuda.device_count()} GPUs")
    return torch.device("cuda", index)


def _deserialize(trt: ModuleType, path: Path) -> tuple[object, object]:
    """(runtime, engine) for the plan file; the runtime is kept as long as the engine it made."""
    try:
        plan = path.read_bytes()
    except OSError as err:
        raise EngineError(f"{path}: cannot read the TensorRT plan ({err.strerror or err}); build it with "
                          "rtdecode build-engines") from None  # fmt: skip
    trt_log = tensorrt_logger()
    before = trt_log.error_count
    runtime = trt.Runtime(trt_log)
    try:
        engine = runtime.deserialize_cuda_engine(plan)
    except (RuntimeError, TypeError, ValueError):
        engine = None
    if engine is None:
        raise EngineError(
            f"{path}: TensorRT {trt.__version__} cannot deserialise this plan: built by another TensorRT version or "
            f"for another GPU, or the file is damaged{tensorrt_detail(trt_log.errors_since(before))}; {REBUILD_HINT}"
        )
    return runtime, engine


def _check_io(trt: ModuleType, engine, signature: Signature, path: Path) -> None:
    """EngineError unless the engine's input and output names are the signature's and every input has the
    signature's static shape."""
    names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
    inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
    outputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
    if sorted(inputs) != sorted(signature.input_names) or sorted(outputs) != sorted(signature.outputs):
        raise EngineError(
            f"{path}: the engine's inputs {inputs} and outputs {outputs} differ from the signature of stage "
            f"{signature.stage!r} (inputs {list(signature.input_names)}, outputs {list(signature.outputs)}); "
            f"{REBUILD_HINT} from the current ONNX export"
        )
    for spec in signature.inputs:
        engine_shape = _static_shape(engine, spec.name)
        if engine_shape != spec.shape:
            raise EngineError(
                f"{path}: input {spec.name!r} has shape {engine_shape} in the engine (-1: a free axis) and "
                f"{spec.describe()} in the signature of stage {signature.stage!r}; a TensorRT engine serves one static "
                f"shape: {REBUILD_HINT} at the signature's shape"
            )


def _static_shape(engine, name: str) -> tuple[int, ...]:
    """The one shape an engine input accepts: its own shape, or where the ONNX graph left an axis free (-1, the
    batch axis of our exports) the shape its profile 0 pins with min = opt = max (anything else stays -1)."""
    shape = tuple(int(size) for size in engine.get_tensor_shape(name))
    if -1 not in shape:
        return shape
    low, best, high = (tuple(int(size) for size in bound) for bound in engine.get_tensor_profile_shape(name, 0))
    return low if low == best == high else shape
