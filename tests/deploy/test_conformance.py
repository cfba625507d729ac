"""One conformance suite over every engine backend: the same stage graphs, the same inputs, the same outputs
within tolerance, and the same refusals with the same words.

Backends: torch eager (the reference), torch compiled (inductor, on the smallest stage: compiling every UNet on
two CPU cores would take minutes), onnxruntime (the built ONNX files), TensorRT (built here from the same ONNX
files at fp32; those cases run wherever ``tensorrt`` imports and a GPU is present).
"""

import pytest
import torch

from rtdecode.engines.engine import TorchEngine
from rtdecode.engines.onnxruntime_engine import OnnxRuntimeEngine
from rtdecode.errors import EngineError
from rtdecode.stage_graphs import STAGES

RELATIVE_RMS = {"torch compile": 1e-5, "onnxruntime": 1e-4, "tensorrt": 1e-3}  # fp32 everywhere
BACKENDS = [
    pytest.param("torch compile", "prior_step", id="torch_compile-prior_step"),
    *(pytest.param("onnxruntime", stage, id=f"onnxruntime-{stage}") for stage in STAGES),
    *(pytest.param("tensorrt", stage, id=f"tensorrt-{stage}", marks=pytest.mark.tensorrt) for stage in STAGES),
]


def open_backend(built, backend: str, stage: str, tmp_path):
    """The stage's engine on ``backend``, all with the same static signature (the serving shapes)."""
    graph = built.graphs[stage]
    entry = next(entry for entry in built.manifest.engines if entry.stage == stage)
    onnx_path = built.site.engines_dir / entry.file
    if backend == "torch eager":
        return TorchEngine(graph.signature(), graph.module)
    if backend == "torch compile":
        return TorchEngine(graph.signature(), graph.module, mode="compile")
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(graph.signature(), onnx_path)
    from deploy.tensorrt_build import build_tensorrt_engine
    from rtdecode.engines.tensorrt_engine import TensorRTEngine

    plan_path, cache_path = tmp_path / f"{stage}.plan", tmp_path / "timing.cache"
    build_tensorrt_engine(
        onnx_path, plan_path, precision="fp32", input_shapes=graph.input_shapes, timing_cache_path=cache_path
    )
    return TensorRTEngine(graph.signature(), plan_path, precision="fp32", device="cuda")


def inputs_of(built, stage: str, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(value.shape, generator=generator) for value in built.graphs[stage].inputs.values()]


@pytest.mark.parametrize(("backend", "stage"), BACKENDS)
def test_same_inputs_give_the_same_outputs(built, backend, stage, tmp_path):
    reference = open_backend(built, "torch eager", stage, tmp_path)
    engine = open_backend(built, backend, stage, tmp_path)
    for seed in (1, 2):  # twice: a later call must not return the first call's answer (static buffers, graphs)
        inputs = inputs_of(built, stage, seed)
        expected = reference(*inputs)
        outputs = engine(*inputs)
        assert len(outputs) == len(expected) == len(built.graphs[stage].outputs)
        for ours, theirs in zip(outputs, expected, strict=True):
            assert ours.dtype == torch.float32 and ours.shape == theirs.shape
            error = float((ours.cpu() - theirs.cpu()).norm() / theirs.norm())
            assert error <= RELATIVE_RMS[backend], (stage, error)


@pytest.mark.parametrize(("backend", "stage"), [p for p in BACKENDS if p.values[1] in ("embed", "unclip_unet",
                                                                                         "prior_step")])  # fmt: skip
def test_the_same_inputs_are_refused_with_the_same_words(built, backend, stage, tmp_path):
    reference = open_backend(built, "torch eager", stage, tmp_path)
    engine = open_backend(built, backend, stage, tmp_path)
    good = inputs_of(built, stage, 3)
    wrong_batch = [torch.cat([good[0], good[0]]), *good[1:]]
    wrong_width = [good[0][..., :-1], *good[1:]]
    integers = [good[0].long(), *good[1:]]
    for bad in (good[:-1], wrong_batch, wrong_width, integers, [None, *good[1:]]):
        with pytest.raises(EngineError) as expected:
            reference(*bad)
        with pytest.raises(EngineError) as refused:
            engine(*bad)
        assert str(refused.value) == str(expected.value)
        assert stage in str(refused.value)
