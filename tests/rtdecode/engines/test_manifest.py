"""The engine manifest: written and read back, refused when malformed, and every reason an engine is stale."""

import json
import os

import pytest

from rtdecode.engines.manifest import EngineEntry, EngineManifest, Platform, current_platform, stale_reasons
from rtdecode.engines.weights import WeightHasher, file_sha256
from rtdecode.errors import EngineError

H100 = Platform("2.13.0", "1.32.0", "10.13.0", "13.0", "NVIDIA H100 80GB HBM3", "9.0")


def manifest(tmp_path, weights_sha: str) -> EngineManifest:
    (tmp_path / "unet.plan").write_bytes(b"engine")
    (tmp_path / "embed.onnx").write_bytes(b"graph")
    return EngineManifest(
        "new01",
        H100,
        (
            EngineEntry("unet", "unet.plan", "tensorrt", "fp16", {"sample": (2, 4, 96, 96)}, ("eps",), weights_sha),
            EngineEntry(
                "embed", "embed.onnx", "onnxruntime", "fp32", {"voxels": (1, 8000)}, ("backbone",), weights_sha
            ),
        ),
    )


def test_a_manifest_round_trips(tmp_path):
    written = manifest(tmp_path, "ab" * 32)
    path = written.write(tmp_path)
    assert EngineManifest.read(tmp_path) == written
    assert json.loads(path.read_text())["engines"][0]["input_shapes"] == {"sample": [2, 4, 96, 96]}


def test_engines_built_here_for_these_weights_are_fresh(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"w" * 5_000_000)  # more than one hash chunk
    sha = file_sha256(weights)
    reasons = stale_reasons(manifest(tmp_path, sha), tmp_path, H100, {"unet": sha, "embed": sha})
    assert reasons == {"unet": [], "embed": []}


def test_every_reason_an_engine_is_stale_is_named(tmp_path):
    built = manifest(tmp_path, "ab" * 32)
    (tmp_path / "unet.plan").unlink()
    cpu_host = Platform("2.13.0", None, None, None, None, None)
    reasons = stale_reasons(built, tmp_path, cpu_host, {"unet": "cd" * 32, "embed": "ab" * 32})
    assert reasons["unet"] == [
        "engine file unet.plan is missing",
        "weights changed since the build (sha256 abababababab -> cdcdcdcdcdcd)",
        "built for TensorRT 10.13.0, this host has none",
        "built for GPU NVIDIA H100 80GB HBM3, this host has none",
        "built for compute capability 9.0, this host has none",
    ]
    assert reasons["embed"] == ["onnxruntime is not installed here"]
    other_gpu = Platform("2.13.0", "1.32.0", "10.13.0", "13.0", "NVIDIA H200", "9.0")
    (tmp_path / "unet.plan").write_bytes(b"engine")
    assert stale_reasons(built, tmp_path, other_gpu, {"unet": "ab" * 32, "embed": "ab" * 32})["unet"] == [
        "built for GPU NVIDIA H100 80GB HBM3, this host has NVIDIA H200"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not a readable engine manifest"),
        ('{"format": "other"}', "not an engine manifest"),
        ('{"format": "rtdecode-engines", "format_version": 9}', "format_version 9"),
        ('{"format": "rtdecode-engines", "format_version": 1, "subject": "s"}', "malformed engine manifest"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_file(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(EngineError, match=f"manifest.json: .*{message}"):
        EngineManifest.read(tmp_path)


def test_an_unknown_backend_is_refused(tmp_path):
    value = manifest(tmp_path, "ab" * 32).to_json()
    value["engines"][0]["backend"] = "openvino"
    (tmp_path / "manifest.json").write_text(json.dumps(value))
    with pytest.raises(EngineError, match="backend 'openvino'"):
        EngineManifest.read(tmp_path)


def test_this_hosts_platform_is_read_without_a_gpu():
    import onnxruntime
    import torch

    here = current_platform()
    assert here.torch == torch.__version__ and here.onnxruntime == onnxruntime.__version__
    if not torch.cuda.is_available():
        assert (here.gpu, here.cuda, here.compute_capability) == (None, None, None)


def test_a_change_of_serving_shape_makes_an_engine_stale(tmp_path):
    built = manifest(tmp_path, "ab" * 32)
    weights = {"unet": "ab" * 32, "embed": "ab" * 32}
    same = {"unet": {"sample": (2, 4, 96, 96)}, "embed": {"voxels": (5, 8000)}}  # onnxruntime: any batch
    assert stale_reasons(built, tmp_path, H100, weights, same) == {"unet": [], "embed": []}
    other = {"unet": {"sample": (1, 4, 128, 128)}, "embed": {"voxels": (1, 7000)}}
    reasons = stale_reasons(built, tmp_path, H100, weights, other)
    assert reasons["unet"] == [
        "built for inputs sample (2, 4, 96, 96), the configured models feed sample (1, 4, 128, 128)"
    ]
    assert reasons["embed"] == ["built for inputs voxels (8000,), the configured models feed voxels (7000,)"]


def test_signatures_follow_the_backend(tmp_path):
    unet, embed = manifest(tmp_path, "ab" * 32).engines
    assert unet.signature().inputs[0].shape == (2, 4, 96, 96)  # TensorRT: the static serving shape
    assert embed.signature().inputs[0].shape == (None, 8000)  # an ONNX graph: any batch


def test_weight_hashes_are_cached_by_size_and_time(tmp_path):
    weights = tmp_path / "model" / "weights.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 1000)
    hasher = WeightHasher(tmp_path / "engines")
    first = hasher.files_sha256([weights])
    hasher.save()
    cache = json.loads((tmp_path / "engines" / "weights-sha256.json").read_text())
    assert cache[str(weights.resolve())]["sha256"] == file_sha256(weights)
    cache[str(weights.resolve())]["sha256"] = "0" * 64  # an untouched file is not read again: the cache answers
    (tmp_path / "engines" / "weights-sha256.json").write_text(json.dumps(cache))
    assert WeightHasher(tmp_path / "engines").files_sha256([weights]) != first
    modified_ns = weights.stat().st_mtime_ns
    replacement = tmp_path / "model" / "new.safetensors"
    replacement.write_bytes(b"a" * 1000)  # replaced with the same size and modification time: the inode tells
    replacement.replace(weights)
    os.utime(weights, ns=(modified_ns, modified_ns))
    assert WeightHasher(tmp_path / "engines").files_sha256([weights]) == first
