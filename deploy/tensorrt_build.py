"""Build a TensorRT plan from a stage's ONNX export, at the stage's static serving shapes.

One optimisation profile with min = opt = max = the serving shapes: the plan serves exactly those shapes, which is
what lets :class:`rtdecode.engines.tensorrt_engine.TensorRTEngine` replay it as a CUDA graph. Precision ``fp16`` and
``bf16`` let TensorRT pick reduced-precision kernels (the engine's inputs and outputs stay float32); ``fp32`` sets no
flag (TensorRT's default, which allows TF32 on Ampere and later); ``fp8`` is refused (see :data:`FP8_REFUSAL`). A
timing cache, when given, is read before the build and written back after it, so rebuilding on the same GPU and
TensorRT version skips the kernel timing. The plan and the cache are written atomically: a crash never leaves a
half-written plan where the daemon would open it.
"""

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from rtdecode.engines.tensorrt_engine import import_tensorrt, tensorrt_detail, tensorrt_logger
from rtdecode.errors import EngineError
from rtdecode.file_integrity import write_atomically

log = logging.getLogger(__name__)

PRECISION_FLAGS = {"fp32": None, "fp16": "FP16", "bf16": "BF16"}  # precision -> TensorRT BuilderFlag member
OPTIMIZATION_LEVELS = range(6)  # TensorRT's builder_optimization_level: 0 (fast build) .. 5 (slowest, best)
FP8_REFUSAL = (
    "precision 'fp8' is refused: TensorRT runs FP8 kernels only on graphs that carry Q/DQ nodes "
    "(QuantizeLinear/DequantizeLinear) with calibrated scales, as NVIDIA TensorRT Model Optimizer's mtq.quantize "
    "produces them; this command exports plain fp32 graphs and does not calibrate yet, so an fp8 build would "
    "silently run fp16/fp32 kernels. Build with precision fp16 or bf16"
)


def build_tensorrt_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str,
    input_shapes: Mapping[str, tuple[int, ...]],
    timing_cache_path: Path | None,
    workspace_bytes: int | None = None,
    optimization_level: int = 3,
) -> Path:
    """Build ``onnx_path`` (its external-data files beside it) into ``plan_path`` for this GPU and TensorRT version,
    at ``input_shapes`` ({input name: static shape}); returns ``plan_path``. EngineError, naming the file, when
    TensorRT is missing, the graph does not parse, the shapes do not fit the graph or the build fails."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    shapes = _checked_settings(precision, input_shapes, workspace_bytes, optimization_level)
    trt = import_tensorrt(f"building {plan_path} from {onnx_path}")
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: no ONNX file here; export the stage first (rtdecode build-engines does)")
    trt_log = tensorrt_logger()
    builder = trt.Builder(trt_log)
    network = builder.create_network(0)  # TensorRT 10: every network has an explicit batch axis
    parser = _parsed(trt, network, onnx_path)  # owns the weights: must live until the build is done
    _check_inputs(network, shapes, onnx_path)
    config = _config(trt, builder, precision, shapes, workspace_bytes, optimization_level)
    _load_timing_cache(config, timing_cache_path)
    started = time.monotonic()
    before = trt_log.error_count
    plan = builder.build_serialized_network(network, config)
    del parser
    if plan is None:
        raise EngineError(
            f"{onnx_path}: TensorRT {trt.__version__} could not build the {precision} engine"
            f"{tensorrt_detail(trt_log.errors_since(before))}; if it ran out of GPU memory, free the GPU or lower "
            "optimization_level"
        )
    _write_atomically(plan_path, plan)
    if timing_cache_path is not None:
        _write_atomically(Path(timing_cache_path), config.get_timing_cache().serialize())
    log.info(
        "built %s from %s", plan_path, onnx_path.name,
        extra={"fields": {"precision": precision, "build_s": round(time.monotonic() - started, 1),
                          "plan_bytes": plan_path.stat().st_size}},
    )  # fmt: skip
    return plan_path


def _checked_settings(precision: str, input_shapes: Mapping[str, tuple[int, ...]], workspace_bytes: int | None,
                      optimization_level: int) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """The input shapes as {name: tuple of ints}; EngineError for any setting TensorRT would refuse later."""
    if precision == "fp8":
        raise EngineError(FP8_REFUSAL)
    if precision not in PRECISION_FLAGS:
        raise EngineError(f"precision must be one of {[*PRECISION_FLAGS, 'fp8']}, got {precision!r}")
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise EngineError(f"optimization_level must be 0..5 (TensorRT's builder levels), got {optimization_level!r}")
    if workspace_bytes is not None and (not isinstance(workspace_bytes, int) or workspace_bytes <= 0):
        raise EngineError(f"workspace_bytes must be a positive number of bytes or None, got {workspace_bytes!r}")
    if not input_shapes:
        raise EngineError("input_shapes is empty: give every graph input its static serving shape")
    shapes = {}
    for name, shape in input_shapes.items():
        if not all(isinstance(size, int) and size > 0 for size in shape):
            raise EngineError(f"input_shapes[{name!r}] must be positive integer sizes, got {tuple(shape)}")
        shapes[name] = tuple(shape)
    return shapes


def _parsed(trt: ModuleType, network, onnx_path: Path):
    """The ONNX parser after filling ``network`` from the file (by path, so its external data is found);
    EngineError listing every parser error."""
    parser = trt.OnnxParser(network, tensorrt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(index) for index in range(parser.num_errors)]
        listed = "; ".join(f"node {error.node()}: {error.desc()}" for error in errors) or "no error reported"
        raise EngineError(
            f"{onnx_path}: TensorRT {trt.__version__} cannot parse this ONNX graph ({listed}); re-export it, or "
            "use a TensorRT that supports these operators"
        )
    return parser


def _check_inputs(network, shapes: Mapping[str, tuple[int, ...]], onnx_path: Path) -> None:
    """EngineError unless ``shapes`` names exactly the graph's inputs and fits each one's fixed axes."""
    graph = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        graph[tensor.name] = tuple(int(size) for size in tensor.shape)
    if set(shapes) != set(graph):
        unknown, missing = sorted(set(shapes) - set(graph)), sorted(set(graph) - set(shapes))
        raise EngineError(
            f"{onnx_path}: input_shapes names {sorted(shapes)} but the graph's inputs are {sorted(graph)} "
            f"(unknown: {unknown}, missing: {missing})"
        )
    for name, shape in shapes.items():
        fixed = graph[name]
        if len(fixed) != len(shape) or any(want >= 0 and want != size for want, size in zip(fixed, shape, strict=True)):
            raise EngineError(f"{onnx_path}: input {name!r} is {fixed} in the graph (-1: a free axis), "
                              f"input_shapes gives {shape}")  # fmt: skip


def _config(trt: ModuleType, builder, precision: str, shapes: Mapping[str, tuple[int, ...]],
            workspace_bytes: int | None, optimization_level: int):  # fmt: skip
    """The builder config: one static profile, the precision flag, the optimisation level, the workspace limit."""
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, shape, shape, shape)  # min = opt = max: the static serving shape
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT refused the optimisation profile {dict(shapes)}")
    flag_name = PRECISION_FLAGS[precision]
    if flag_name is not None:
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is None:
            raise EngineError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{flag_name}, so it cannot build a {precision} engine "
                f"from an fp32 graph (TensorRT 11 keeps the graph's own types); build with TensorRT 10.x"
            )
        config.set_flag(flag)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 would round matmul inputs to 10 bits
    config.builder_optimization_level = optimization_level
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    return config


def _load_timing_cache(config, path: Path | None) -> None:
    """Give the build the timing cache at ``path`` (an empty one when the file is not there yet). A cache made by
    another TensorRT version or GPU, or a damaged one, is not used: a warning, and the build starts from empty."""
    if path is None:
        return
    path = Path(path)
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as err:
        raise EngineError(
            f"{path}: cannot read the timing cache ({err.strerror or err}); delete it to start afresh"
        ) from None
    try:
        cache = config.create_timing_cache(data)
        accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError, ValueError):
        accepted = False
    if not accepted:
        log.warning("%s: timing cache made by another TensorRT version or GPU, or damaged; building without it "
                    "(it is overwritten after the build)", path)  # fmt: skip
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _write_atomically(path: Path, data) -> None:
    """Write ``data`` (bytes or a buffer such as TensorRT's IHostMemory) to ``path`` through a temporary file
    beside it, so ``path`` is either the old file or the whole new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as err:
        raise EngineError(
            f"{path}: cannot write ({err.strerror or err}); check the folder's space and permissions"
        ) from None
