"""Export a stage graph to ONNX (torch's dynamo exporter), with its weights in an external data file when the
graph is too big for one protobuf (2 GB), and check the result with ONNX's checker.

The batch axis is exported dynamic, so one file serves onnxruntime at any batch and TensorRT at the static serving
shape of its optimisation profile. A batch-1 example is doubled for the export: the exporter would otherwise
specialise the axis to 1.
"""

from pathlib import Path

import torch
from torch import nn

from rtdecode.errors import EngineError
from rtdecode.stage_graphs import StageGraph

EXTERNAL_DATA_BYTES = 2_000_000_000  # below protobuf's 2 GiB hard limit, with room for the graph itself
MAX_BATCH = 64


def export_onnx(graph: StageGraph, path: Path, *, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Path:
    """Write ``graph`` to ``path`` (fp32, eval mode, dynamic batch); returns the path. ``path.data`` holds the
    weights when they exceed ``external_data_bytes``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = tuple(_doubled(value) for value in graph.inputs.values())
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    external = weight_bytes(graph.module) > external_data_bytes
    try:
        with torch.no_grad():
            torch.onnx.export(
                graph.module.eval(),
                examples,
                str(path),
                input_names=list(graph.inputs),
                output_names=list(graph.outputs),
                dynamo=True,
                external_data=external,
                dynamic_shapes=tuple({0: batch} for _ in examples),
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; name the stage and keep the cause
        raise EngineError(f"stage {graph.stage!r}: ONNX export to {path} failed: {err}") from err
    check_onnx(path)
    return path


def check_onnx(path: Path) -> None:
    """ONNX's checker on the file (by path, so external data is found and > 2 GB graphs are allowed)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as err:
        raise EngineError(f"{path}: not a valid ONNX graph ({err})") from None


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _doubled(value: torch.Tensor) -> torch.Tensor:
    return torch.cat([value, value]) if value.shape[0] == 1 else value
