"""rtdecode build-engines / verify-engines and the daemon's choice of engines, on a tiny subject (onnxruntime on
the CPU; the TensorRT path is tests/rtdecode/engines/test_tensorrt.py and the conformance suite)."""

import json
import logging
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file, save_file

from deploy.build import FIXTURES_DIR, BuildSettings, build_engines, forget_verdicts
from deploy.cli import STAGE_NAMES
from deploy.onnx_export import export_onnx
from deploy.verify import verify_engines
from rtdecode.cli import main
from rtdecode.decoding import load_decoder
from rtdecode.engines.manifest import EngineManifest, current_platform
from rtdecode.engines.onnxruntime_engine import CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntimeEngine
from rtdecode.errors import EngineError
from rtdecode.stage_engines import ENGINES_DIR, select_engines
from rtdecode.stage_graphs import STAGES
from rtdecode.store import Store
from tests.deploy.engine_site import SUBJECT


def test_every_stage_is_exported_with_a_manifest(built):
    manifest = EngineManifest.read(built.site.engines_dir)
    assert manifest == built.manifest
    assert manifest.subject == SUBJECT and manifest.platform == current_platform()
    assert [entry.stage for entry in manifest.engines] == list(STAGES)
    for entry in manifest.engines:
        path = built.site.engines_dir / entry.file
        onnx.checker.check_model(str(path))  # an independent check of every graph CI builds
        graph = onnx.load(str(path), load_external_data=False).graph
        assert [i.name for i in graph.input] == list(entry.input_shapes)
        assert [o.name for o in graph.output] == list(entry.outputs)
        assert (entry.backend, entry.precision, len(entry.weights_sha256)) == ("onnxruntime", "fp32", 64)
        assert dict(entry.input_shapes) == built.graphs[entry.stage].input_shapes
        assert (built.site.engines_dir / FIXTURES_DIR / f"{entry.stage}.npz").is_file()
    unet = next(e for e in manifest.engines if e.stage == "unclip_unet")
    assert unet.input_shapes["sample"][0] == 2  # one trial, both guidance halves


def test_the_serving_shapes_follow_the_models():
    assert STAGE_NAMES == STAGES  # the CLI's --stage choices, spelled out to keep --help light


def test_verify_passes_every_engine_and_writes_a_report(built):
    checks = verify_engines(built.site.engines_dir, "cpu")
    assert [c.stage for c in checks] == list(STAGES)
    assert all(c.status == "pass" for c in checks), [(c.stage, c.reason) for c in checks]
    assert max(max(c.relative_rms_error.values()) for c in checks) < 1e-4
    assert (built.site.engines_dir / "verify.json").is_file()


def test_verify_fails_an_engine_that_differs_from_torch(built, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(built.site.engines_dir, folder)
    fixture = folder / FIXTURES_DIR / "prior_step.npz"
    with np.load(fixture) as arrays:
        saved = dict(arrays)
    saved["output/x0"] = saved["output/x0"] * 1.05  # torch "said" something 5 % different
    np.savez(fixture, **saved)
    (folder / "onnx" / "low_level.onnx").unlink()
    checks = {c.stage: c for c in verify_engines(folder, "cpu")}
    assert checks["prior_step"].status == "fail"
    assert checks["prior_step"].relative_rms_error["x0"] == pytest.approx(0.05 / 1.05, rel=1e-3)
    assert checks["low_level"].status == "cannot_run" and "missing" in checks["low_level"].reason
    assert checks["embed"].status == "pass"


def test_verify_engines_command_prints_the_table(built, capsys):
    assert main(["--config", str(built.site.config_path), "verify-engines", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(" pass ") == len(STAGES) and "verify.json" in out


@pytest.mark.parametrize(
    ("backend", "precision", "words"),
    [
        ("onnx", "fp16", "TensorRT precision"),
        ("tensorrt", "fp8", "Q/DQ"),
        ("cuda", "fp32", "--backend"),
        ("tensorrt", "fp16", "(?i)tensorrt"),  # not importable here; where it is, this CPU device is refused
    ],
)
def test_builds_that_cannot_be_honoured_are_refused_before_any_work(backend, precision, words):
    with pytest.raises(EngineError, match=words):
        BuildSettings(backend=backend, precision=precision, device="cpu").check()


def test_build_command_refuses_onnx_at_fp16(built, capsys):
    code = main(["--config", str(built.site.config_path), "build-engines", "--backend", "onnx", "--precision", "fp16"])
    assert code == 2 and "TensorRT precision" in capsys.readouterr().err


def test_big_graphs_keep_their_weights_beside_the_onnx_file(built, tmp_path):
    graph = built.graphs["embed"]
    path = export_onnx(graph, tmp_path / "embed.onnx", external_data_bytes=0)
    inline = export_onnx(graph, tmp_path / "inline" / "embed.onnx")  # the default threshold: 2 GB
    ridge_bytes = graph.module.ridge.weight.numel() * 4
    assert not (tmp_path / "inline" / "embed.onnx.data").exists()
    assert (tmp_path / "embed.onnx.data").stat().st_size >= ridge_bytes
    assert path.stat().st_size < inline.stat().st_size - ridge_bytes
    engine = OnnxRuntimeEngine(graph.signature(dynamic_batch=True), path)
    voxels = torch.randn(3, graph.inputs["voxels"].shape[1])  # any batch: the exported axis is dynamic
    for ours, theirs in zip(engine(voxels), graph.run_torch([voxels]), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_decoder_runs_the_engines_and_decodes_as_torch_does(built, caplog):
    config = built.site.config()
    bundle_dir = Store(config.home).bundle_dir(SUBJECT)
    with caplog.at_level(logging.INFO, logger="rtdecode.stage_engines"):
        engined = load_decoder(config, bundle_dir)
    assert "engines in use: embed: onnxruntime fp32" in caplog.text and "in torch: nothing" in caplog.text
    plain = load_decoder(built.site.config("generate.engines=off"), bundle_dir)
    beta = np.random.default_rng(5).standard_normal(engined.n_voxels).astype(np.float32)
    ours, theirs = (decoder.reconstructor.preview(beta[None]) for decoder in (engined, plain))
    torch.testing.assert_close(ours.outputs.backbone, theirs.outputs.backbone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.low_level_images, theirs.low_level_images, rtol=1e-4, atol=1e-4)
    final_ours = engined.reconstructor.reconstruct(ours, seed=11)[0]
    final_theirs = plain.reconstructor.reconstruct(theirs, seed=11)[0]
    assert final_ours.caption == final_theirs.caption
    difference = np.abs(final_ours.final.astype(int) - final_theirs.final.astype(int))
    assert difference.max() <= 2, difference.max()  # uint8 levels
    assert np.abs(final_ours.final.astype(int) - 128).mean() > 1  # an image, not a blank


def test_changed_weights_make_that_stage_fall_back_to_torch(built, tmp_path, caplog):
    changed = tmp_path / "low_level_vae"
    shutil.copytree(built.site.components["low_level_vae_dir"], changed)
    weights = next(changed.glob("*.safetensors"))
    state = load_file(weights)
    save_file({name: value * 1.01 for name, value in state.items()}, weights)
    config = built.site.config(f"models.low_level_vae_dir={changed}")
    with caplog.at_level(logging.INFO, logger="rtdecode.stage_engines"):
        decoder = load_decoder(config, Store(config.home).bundle_dir(SUBJECT))
    assert "running in torch (no compiled engine) for low_level_decode: stale: weights changed" in caplog.text
    assert "rtdecode build-engines --subject syn08" in caplog.text
    assert "unclip_unet: onnxruntime fp32" in caplog.text  # the other stages keep their engines
    assert decoder.reconstructor.preview(np.zeros((1, decoder.n_voxels), np.float32)).low_level_images is not None


def test_without_engines_every_stage_says_how_to_build_them(built, tmp_path):
    selection = select_engines(tmp_path / "no-engines", SUBJECT, list(built.graphs.values()), "cpu")
    assert selection.engines == {}
    assert set(selection.torch_reasons) == set(STAGES)
    assert all("rtdecode build-engines --subject syn08" in reason for reason in selection.torch_reasons.values())


def test_engines_of_another_subject_are_not_used(built):
    selection = select_engines(built.site.engines_dir, "someone_else", list(built.graphs.values()), "cpu")
    assert selection.engines == {}
    assert "built for subject 'syn08'" in selection.torch_reasons["embed"]


def test_a_graph_that_does_not_load_falls_back(built, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(built.site.engines_dir, folder)
    (folder / "onnx" / "refiner_unet.onnx").write_bytes(b"not a graph")
    graphs = list(built.graphs.values())
    damaged = select_engines(folder, SUBJECT, graphs, "cpu")
    assert "refiner_unet" in damaged.torch_reasons
    assert "did not open" in damaged.torch_reasons["refiner_unet"]
    assert "refiner_unet.onnx" in damaged.torch_reasons["refiner_unet"]
    assert set(damaged.engines) == set(STAGES) - {"refiner_unet"}


def test_a_damaged_manifest_leaves_every_stage_in_torch(built, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(built.site.engines_dir, folder)
    (folder / "manifest.json").write_text("{ not json")
    selection = select_engines(folder, SUBJECT, list(built.graphs.values()), "cpu")
    assert selection.engines == {}
    assert "manifest.json: not a readable engine manifest" in selection.torch_reasons["unclip_unet"]


def test_stages_that_verify_failed_run_in_torch_and_low_level_follows_embed(built, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(built.site.engines_dir, folder)
    fixture = folder / FIXTURES_DIR / "embed.npz"
    with np.load(fixture) as arrays:
        saved = {name: value * (1.1 if name.startswith("output/") else 1.0) for name, value in arrays.items()}
    np.savez(fixture, **saved)
    assert {c.stage: c.status for c in verify_engines(folder, "cpu")}["embed"] == "fail"
    selection = select_engines(folder, SUBJECT, list(built.graphs.values()), "cpu")
    assert "verify-engines failed it" in selection.torch_reasons["embed"]
    assert "embed runs in torch" in selection.torch_reasons["low_level"]
    assert "prior_step" in selection.engines
    forget_verdicts(folder, {"unclip_unet"})  # a rebuild of another stage keeps embed's verdict
    selection = select_engines(folder, SUBJECT, list(built.graphs.values()), "cpu")
    assert "verify-engines failed it" in selection.torch_reasons["embed"]
    forget_verdicts(folder, {"embed", "low_level"})  # rebuilt: the verdict on the old engine is gone
    assert "embed" in select_engines(folder, SUBJECT, list(built.graphs.values()), "cpu").engines
    assert "embed" not in {check["stage"] for check in json.loads((folder / "verify.json").read_text())["checks"]}


def test_onnxruntime_without_its_cuda_provider_warns_that_it_runs_on_the_cpu(built, caplog):
    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider (onnxruntime-gpu)")
    entry = next(entry for entry in built.manifest.engines if entry.stage == "embed")
    with caplog.at_level(logging.WARNING):
        engine = OnnxRuntimeEngine(entry.signature(), built.site.engines_dir / entry.file, device="cuda")
    assert engine.provider == CPU_PROVIDER and "embed.onnx: this onnxruntime has no CUDA provider" in caplog.text


def test_static_serving_shapes_without_guidance(built, tmp_path):
    """Engines that take exactly their serving shapes (as TensorRT's do) serve a decoder with guidance 1, whose
    UNets see one latent per trial instead of two."""
    home = tmp_path / "home"
    shutil.copytree(built.site.folder / "home", home, ignore=shutil.ignore_patterns("engines"))
    overrides = (f"paths.home={home}", "generate.unclip_guidance=1.0", "generate.refine_guidance=1.0")
    config = built.site.config(*overrides)
    stages = ("unclip_unet", "refiner_unet")
    build_engines(config, SUBJECT, BuildSettings(backend="onnx", precision="fp32", device="cpu", stages=stages))
    entries = EngineManifest.read(Store(home).bundle_dir(SUBJECT) / ENGINES_DIR).engines
    assert [(e.stage, e.input_shapes["sample"][0]) for e in entries] == [("unclip_unet", 1), ("refiner_unet", 1)]
    decoder = load_decoder(config, Store(config.home).bundle_dir(SUBJECT))
    for entry in entries:  # what a TensorRT engine enforces: exactly the built shapes
        assert entry.signature().inputs[0].shape[1:] == entry.input_shapes["sample"][1:]
    beta = np.ones((1, decoder.n_voxels), np.float32)
    result = decoder.reconstructor.reconstruct(decoder.reconstructor.preview(beta), seed=1)[0]
    assert result.final.shape == (24, 24, 3)
