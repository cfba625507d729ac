"""The TensorRT path: a small torch module exported to ONNX (dynamo exporter, weights as external data), built into
fp32 and fp16 plans, run against torch, and every refusal. All but the last test need TensorRT and a GPU."""

import copy
import logging

import pytest
import torch
from torch import nn

from deploy.tensorrt_build import build_tensorrt_engine
from rtdecode.engines.signature import Signature
from rtdecode.engines.tensorrt_engine import TensorRTEngine
from rtdecode.errors import EngineError

INPUT_SHAPES = {"image": (2, 4, 8, 8), "vector": (2, 16)}
OUTPUTS = ("features", "embedding")
RELATIVE_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}


class Toy(nn.Module):
    """Two float32 inputs, two outputs; a conv and a linear, so TensorRT picks real kernels for both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.linear = nn.Linear(16, 32)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(image))
        return features * 0.5, self.linear(vector) + features.mean(dim=(1, 2, 3)).unsqueeze(1)


def signature(outputs=OUTPUTS, input_shapes=INPUT_SHAPES) -> Signature:
    return Signature.of("toy", input_shapes, outputs)


def toy_inputs(seed: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator).to(device) for shape in INPUT_SHAPES.values())


def reference(module: nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    """The module's outputs in float64 on the CPU: no TF32, no reduced precision."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(value.double().cpu() for value in inputs))


def assert_close(actual, expected, precision: str) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        error = (got.double().cpu() - want).abs().max().item()
        assert error <= RELATIVE_TOLERANCE[precision] * want.abs().max().item(), error


@pytest.fixture(scope="module")
def toy() -> nn.Module:
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture(scope="module")
def onnx_file(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    torch.onnx.export(
        toy, toy_inputs(0, "cpu"), str(path), input_names=list(INPUT_SHAPES), output_names=list(OUTPUTS), dynamo=True
    )
    return path


@pytest.fixture(scope="module")
def plans(onnx_file, tmp_path_factory):
    """{precision: plan path}, and the timing cache both builds shared."""
    folder = tmp_path_factory.mktemp("plans")
    cache = folder / "timing.cache"
    built = {
        precision: build_tensorrt_engine(
            onnx_file,
            folder / f"toy-{precision}.plan",
            precision=precision,
            input_shapes=INPUT_SHAPES,
            timing_cache_path=cache,
        )
        for precision in ("fp32", "fp16")
    }
    return built, cache


@pytest.mark.tensorrt
def test_build_writes_the_plans_and_the_timing_cache(plans):
    built, cache = plans
    for plan in built.values():
        assert plan.is_file() and plan.stat().st_size > 0
        assert not plan.with_name(plan.name + ".tmp").exists()
    assert cache.is_file() and cache.stat().st_size > 0


def build_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "deploy.tensorrt_build" and record.levelno >= logging.WARNING]  # fmt: skip


def rebuild(onnx_file, plan, cache):
    """A fast fp32 build of the toy with ``cache`` as its timing cache."""
    return build_tensorrt_engine(onnx_file, plan, precision="fp32", input_shapes=INPUT_SHAPES, timing_cache_path=cache,
                                 optimization_level=0)  # fmt: skip


@pytest.mark.tensorrt
def test_a_rebuild_accepts_the_timing_cache_it_wrote(onnx_file, plans, tmp_path, caplog):
    _, cache = plans
    with caplog.at_level(logging.WARNING, logger="deploy.tensorrt_build"):
        plan = rebuild(onnx_file, tmp_path / "again.plan", cache)
    assert build_warnings(caplog) == []  # made by this TensorRT on this GPU: used
    assert TensorRTEngine(signature(), plan, precision="fp32")(*toy_inputs(7))[0].shape == (2, 8, 8, 8)


@pytest.mark.tensorrt
def test_a_damaged_timing_cache_does_not_stop_the_build_and_is_replaced(onnx_file, tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"damaged" * 100)
    rebuild(onnx_file, tmp_path / "first.plan", cache)
    assert (tmp_path / "first.plan").stat().st_size > 0
    assert cache.read_bytes() != b"damaged" * 100
    with caplog.at_level(logging.WARNING, logger="deploy.tensorrt_build"):
        rebuild(onnx_file, tmp_path / "second.plan", cache)
    assert build_warnings(caplog) == []  # the replacement is a cache TensorRT accepts


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_torch(toy, plans, precision):
    engine = TensorRTEngine(signature(), plans[0][precision], precision=precision)
    inputs = toy_inputs(1)
    assert_close(engine(*inputs), reference(toy, inputs), precision)


@pytest.mark.tensorrt
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_repeated_calls_with_new_inputs_give_new_correct_outputs(toy, plans, cuda_graph):
    engine = TensorRTEngine(signature(), plans[0]["fp32"], precision="fp32", cuda_graph=cuda_graph)
    previous = None
    for seed in (2, 3, 4, 5):
        inputs = toy_inputs(seed)
        outputs = engine(*inputs)
        assert_close(outputs, reference(toy, inputs), "fp32")
        if previous is not None:
            assert not torch.equal(outputs[1], previous[1])
        previous = outputs
    assert engine.uses_cuda_graph is cuda_graph  # the later calls replayed the captured graph with new inputs


@pytest.mark.tensorrt
def test_a_later_call_does_not_overwrite_returned_tensors(plans):
    engine = TensorRTEngine(signature(), plans[0]["fp32"], precision="fp32")
    first = engine(*toy_inputs(10))
    kept = [output.clone() for output in first]
    for seed in (11, 12):
        engine(*toy_inputs(seed))
    torch.cuda.synchronize()
    assert all(torch.equal(output, copy_) for output, copy_ in zip(first, kept, strict=True))


@pytest.mark.tensorrt
def test_outputs_follow_the_signature_order(toy, plans):
    engine = TensorRTEngine(signature(outputs=OUTPUTS[::-1]), plans[0]["fp32"], precision="fp32")
    inputs = toy_inputs(13)
    assert_close(engine(*inputs), reference(toy, inputs)[::-1], "fp32")


@pytest.mark.tensorrt
def test_a_wrong_shape_is_refused_with_the_signature_words(plans):
    engine = TensorRTEngine(signature(), plans[0]["fp32"], precision="fp32")
    image, vector = toy_inputs(14)
    wrong = (image[:, :, :, :7], vector)
    with pytest.raises(EngineError) as expected:
        signature().check(wrong)
    with pytest.raises(EngineError) as refused:
        engine(*wrong)
    assert str(refused.value) == str(expected.value)


@pytest.mark.tensorrt
def test_an_engine_that_does_not_fit_the_signature_is_refused(plans):
    plan = plans[0]["fp32"]
    with pytest.raises(EngineError, match="differ from the signature of stage 'toy'") as names:
        TensorRTEngine(signature(outputs=("features", "other")), plan, precision="fp32")
    assert str(plan) in str(names.value)
    with pytest.raises(EngineError, match="'vector' has shape") as shapes:
        TensorRTEngine(signature(input_shapes={**INPUT_SHAPES, "vector": (1, 16)}), plan, precision="fp32")
    assert str(plan) in str(shapes.value)


@pytest.mark.tensorrt
def test_unknown_or_missing_input_names_are_refused_naming_both_lists(onnx_file, tmp_path):
    with pytest.raises(EngineError, match=r"unknown: \['picture'\], missing: \['image'\]") as refused:
        build_tensorrt_engine(
            onnx_file,
            tmp_path / "x.plan",
            precision="fp32",
            input_shapes={"picture": (2, 4, 8, 8), "vector": (2, 16)},
            timing_cache_path=None,
        )
    assert str(onnx_file) in str(refused.value) and "['image', 'vector']" in str(refused.value)
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.tensorrt
def test_fp8_is_refused_rather_than_built_as_fp16(onnx_file, tmp_path):
    with pytest.raises(EngineError, match="Q/DQ nodes") as refused:
        build_tensorrt_engine(
            onnx_file, tmp_path / "x.plan", precision="fp8", input_shapes=INPUT_SHAPES, timing_cache_path=None
        )
    assert "mtq.quantize" in str(refused.value)
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.tensorrt
def test_a_corrupt_plan_is_refused_naming_the_file(tmp_path):
    plan = tmp_path / "corrupt.plan"
    plan.write_bytes(b"not a TensorRT plan " * 64)
    with pytest.raises(EngineError, match="cannot deserialise") as refused:
        TensorRTEngine(signature(), plan, precision="fp16")
    assert str(plan) in str(refused.value) and "rtdecode build-engines" in str(refused.value)


def _tensorrt_imports() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def test_without_tensorrt_both_entry_points_say_how_to_install_it(tmp_path):
    if _tensorrt_imports():
        pytest.skip("tensorrt imports here")
    install = r"pip install 'rtdecode\[tensorrt\]'"
    with pytest.raises(EngineError, match=install) as opened:
        TensorRTEngine(signature(), tmp_path / "toy.plan", precision="fp16")
    assert str(tmp_path / "toy.plan") in str(opened.value)
    with pytest.raises(EngineError, match=install) as built:
        build_tensorrt_engine(
            tmp_path / "toy.onnx",
            tmp_path / "toy.plan",
            precision="fp16",
            input_shapes=INPUT_SHAPES,
            timing_cache_path=tmp_path / "timing.cache",
        )
    assert str(tmp_path / "toy.onnx") in str(built.value)
    assert not (tmp_path / "toy.plan").exists() and not (tmp_path / "timing.cache").exists()
