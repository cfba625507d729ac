"""`rtdecode pretrain` end to end, as real processes: the synthetic world, exact resume, clear errors.

The smoke test runs the shipped trainer/configs/smoke.toml (8 synthetic subjects, tiny model) and checks
that held-out retrieval ends far above chance. The resume test trains 4 epochs straight and 2 + 2 with a
restart in between (a new process), and requires bit-identical weights and metrics.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from safetensors.numpy import load_file

from tests.helpers import run_rtdecode

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "trainer" / "configs" / "smoke.toml"
TINY_TOWER = {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12, "mlp_ratio": 2.0}


def pretrain(*args: str, check: bool = True, timeout_s: float = 300):
    """``rtdecode pretrain ARGS`` as a real process."""
    return run_rtdecode("pretrain", *args, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout_s=timeout_s, check=check)


def tiny_experiment(tmp_path: Path, world_root: Path, data: dict | None = None, **changes) -> Path:
    """A seconds-long experiment: 2 synthetic subjects, tiny model, BiMixCo for 2 of 4 epochs.

    ``changes`` are ``section__key=value``; ``data`` replaces the data section.
    """
    world = {"n_subjects": 2, "n_test_images": 12, "n_train_images": 40, "image_size_px": 32}
    config = {
        "run": {
            "name": "test",
            "out_dir": str(tmp_path / "run"),
            "cpu": True,
            "progress": False,
            "checkpoint_every_epochs": 1,
        },
        "data": data or {"source": "synthetic", "root": str(world_root), "world": world},
        "model": {"preset": "tiny", "hidden_dim": 32, "low_level": False},
        "targets": {"embedder_random": {"seed": 0, "embed_dim": 16, "vision_cfg": TINY_TOWER}},
        "recipe": {"epochs": 4, "batch_per_subject": 4, "mixup_pct": 0.5, "samples_per_epoch": 48},
        "validation": {"n_way": 12, "n_draws": 3},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "experiment.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@pytest.fixture(scope="module")
def world_root(tmp_path_factory) -> Path:
    """The tiny experiment's world, written once (the GLM fit takes seconds)."""
    tmp = tmp_path_factory.mktemp("world")
    config = tiny_experiment(tmp, tmp / "world", recipe__epochs=1)
    pretrain("--config", str(config), timeout_s=300)
    return tmp / "world"


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_config_reaches_retrieval_far_above_chance(tmp_path):
    result = pretrain(
        "--config",
        str(SMOKE),
        "--set",
        f"run.out_dir={json.dumps(str(tmp_path / 'run'))}",
        "--set",
        f"data.root={json.dumps(str(tmp_path / 'world'))}",
        "--set",
        "run.progress=false",
        timeout_s=900,
    )
    assert "retrieval fwd" in result.stdout
    last = metrics(tmp_path / "run")[-1]
    assert last["epoch"] == 29
    assert len(last["validation"]) == 8  # every subject validated
    for subject in last["validation"]:
        chance = 1 / subject["n_way"]
        assert subject["n_way"] == 60 and subject["n_draws"] == 1  # 60 test images: one 60-way draw
        assert subject["forward"] >= 8 * chance, subject
        assert subject["backward"] >= 8 * chance, subject
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_resume_continues_bit_for_bit(tmp_path, world_root):
    straight = tiny_experiment(tmp_path / "a", world_root)
    split = tiny_experiment(tmp_path / "b", world_root)
    pretrain("--config", str(straight), timeout_s=300)
    pretrain("--config", str(split), "--until-epoch", "2", timeout_s=300)
    assert [m["epoch"] for m in metrics(tmp_path / "b" / "run")] == [0, 1]
    assert not (tmp_path / "b" / "run" / "model").exists()  # the run is not over
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as handle:  # a crash after logging epoch 3, unsaved
        handle.write(json.dumps({"epoch": 2, "loss": {"total": -1.0}}) + "\n")
    resumed = pretrain("--config", str(split), timeout_s=300)
    assert "resumed from" in resumed.stderr
    a, b = metrics(tmp_path / "a" / "run"), metrics(tmp_path / "b" / "run")
    assert [m["epoch"] for m in b] == [0, 1, 2, 3]
    for left, right in zip(a, b, strict=True):
        assert left["loss"] == right["loss"] and left["validation"] == right["validation"] and left["lr"] == right["lr"]
    weights_a = load_file(tmp_path / "a" / "run" / "model" / "mindeye2.safetensors")
    weights_b = load_file(tmp_path / "b" / "run" / "model" / "mindeye2.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key], err_msg=key)


def test_recipe_switches_from_bimixco_to_softclip_and_writes_a_loadable_bundle(tmp_path, world_root):
    from rtdecode.models import load_bundle

    config = tiny_experiment(tmp_path, world_root)
    result = pretrain("--config", str(config), timeout_s=300)
    assert "low-level loss: off" in result.stderr
    records = metrics(tmp_path / "run")
    assert [sorted(r["loss"]) for r in records] == [["contrastive", "prior", "total"]] * 4
    assert [r["contrastive"] for r in records] == ["bimixco", "bimixco", "softclip", "softclip"]
    assert [r["temperature"] for r in records] == [0.006, 0.006, 0.004, pytest.approx(0.0075)]
    assert records[0]["loss"]["total"] > records[-1]["loss"]["total"]
    lrs = [r["lr"] for r in records]
    assert lrs[-1] < lrs[0] and lrs[-1] == pytest.approx(3e-4 / 25 / 1000, rel=1e-6)  # OneCycle ends at start/1000
    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.config.subjects == ("syn01", "syn02")
    outputs = bundle.model.embed(np.zeros((3, bundle.config.n_voxels[1]), dtype=np.float32), "syn02")
    assert tuple(outputs.clip_voxels.shape) == (3, 16, 24)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0003", "epoch-0004"]  # keep_checkpoints = 2


def test_low_level_loss_runs_with_a_vae_folder(tmp_path, world_root):
    from rtdecode.generate.random_components import write_random_low_level_vae

    vae = write_random_low_level_vae(tmp_path / "vae", "tiny")
    config = tiny_experiment(
        tmp_path,
        world_root,
        model__low_level=True,
        recipe__epochs=1,
        targets__low_level_vae=str(vae),
        targets__cache_dir=str(tmp_path / "cache"),
    )
    result = pretrain("--config", str(config), timeout_s=300)
    assert "low-level loss: L1" in result.stderr and "VICRegL" in result.stderr
    (record,) = metrics(tmp_path / "run")
    assert record["loss"]["low_level_l1"] > 0
    expected = 30 * record["loss"]["prior"] + record["loss"]["contrastive"] + 0.5 * record["loss"]["low_level_l1"]
    assert record["loss"]["total"] == pytest.approx(expected, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "latents-6.json",
        "latents-6.npy",
        "tokens.json",
        "tokens.npy",
    ]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, world_root):
    config = tiny_experiment(tmp_path, world_root, recipe__epochs=2)
    pretrain("--config", str(config), "--until-epoch", "1", timeout_s=300)
    result = pretrain("--config", str(config), "--set", "recipe.epochs=3", check=False)
    assert result.returncode == 2
    assert "belongs to a different run" in result.stderr and "epochs: checkpoint 2, this run 3" in result.stderr
    fresh = pretrain("--config", str(config), "--no-resume", check=False)
    assert fresh.returncode == 2 and "already has checkpoints" in fresh.stderr


def _session_root(tmp_path: Path, world_root: Path) -> Path:
    """A copy of the world's bundles, to break."""
    root = tmp_path / "sessions"
    shutil.copytree(world_root, root)
    (root / "world.json").unlink()
    return root


@pytest.mark.parametrize("breakage", ["missing_subject", "voxel_counts", "empty_test_split"])
def test_bad_data_is_refused_before_training(tmp_path, world_root, breakage):
    root = _session_root(tmp_path, world_root)
    args = []
    if breakage == "missing_subject":
        args = ["--set", 'data.subjects=["syn01", "syn09"]']
        expected = "no session bundle for subject(s) ['syn09']"
    elif breakage == "voxel_counts":
        other = root / "syn01" / "ses-02"
        shutil.copytree(root / "syn02" / "ses-01", other)
        manifest = json.loads((other / "session.json").read_text())
        (other / "session.json").write_text(json.dumps({**manifest, "subject": "syn01", "session": 2}))
        expected = "sessions have different voxel counts"
    else:
        for trials in root.glob("syn02/*/trials.tsv"):
            trials.write_text(trials.read_text().replace("\ttest\n", "\ttrain\n"))
        expected = "subject 'syn02'"
    config = tiny_experiment(tmp_path, root, data={"source": "sessions", "root": str(root), "image_size_px": 32})
    result = pretrain("--config", str(config), *args, check=False)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_bad_config_keys_are_named(tmp_path, world_root):
    config = tiny_experiment(tmp_path, world_root)
    result = pretrain("--config", str(config), "--set", "recipe.epochz=3", check=False)
    assert result.returncode == 2
    assert "recipe.epochz: unknown key" in result.stderr
    missing = pretrain("--config", str(tmp_path / "nope.toml"), check=False)
    assert missing.returncode == 2 and "nope.toml does not exist" in missing.stderr


def test_pretrain_help_names_the_recipe():
    result = pretrain("--help")
    for words in ("BiMixCo", "SoftCLIP", "OneCycle", "--until-epoch", "accelerate launch"):
        assert words in result.stdout


def deepspeed_env() -> dict:
    """accelerate + the shipped ZeRO-2 json (optimizer offloaded to the CPU), one rank on DeepSpeed's CPU backend."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        ACCELERATE_USE_DEEPSPEED="true",
        ACCELERATE_DEEPSPEED_CONFIG_FILE=str(REPO / "trainer" / "configs" / "accelerate" / "zero2.json"),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        CUDA_VISIBLE_DEVICES="",  # the CPU backend, as the plain run
    )


def test_deepspeed_zero2_config_trains_and_resumes(tmp_path, world_root):
    env = deepspeed_env()
    plain = tiny_experiment(tmp_path / "plain", world_root)
    zero = tiny_experiment(tmp_path / "zero", world_root, run__cpu=False)  # run.cpu turns DeepSpeed off
    pretrain("--config", str(plain))
    run_rtdecode("pretrain", "--config", str(zero), "--until-epoch", "2", env=env, timeout_s=600)
    assert (tmp_path / "zero" / "run" / "checkpoints" / "epoch-0002" / "pytorch_model").is_dir()  # DeepSpeed's files
    resumed = run_rtdecode("pretrain", "--config", str(zero), env=env, timeout_s=600)
    assert "resumed from" in resumed.stderr
    with_zero, without = metrics(tmp_path / "zero" / "run"), metrics(tmp_path / "plain" / "run")
    assert [m["epoch"] for m in with_zero] == [0, 1, 2, 3]
    for left, right in zip(with_zero, without, strict=True):
        assert left["loss"]["total"] == pytest.approx(right["loss"]["total"], rel=2e-2)  # DeepSpeed's own AdamW path
        assert left["lr"] == pytest.approx(right["lr"], rel=1e-9)
    assert (tmp_path / "zero" / "run" / "model" / "config.json").is_file()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_deepspeed_bf16_trains_and_exports_float32(tmp_path, world_root):
    """DeepSpeed converts the model to bf16 (no autocast): the prior's fp32 buffers must not break the loss."""
    from rtdecode.models import load_bundle

    config = tiny_experiment(tmp_path, world_root, run__cpu=False, run__mixed_precision="bf16", recipe__epochs=3)
    run_rtdecode("pretrain", "--config", str(config), env=deepspeed_env(), timeout_s=600)
    records = metrics(tmp_path / "run")
    assert all(np.isfinite(r["loss"]["total"]) for r in records)
    bundle = load_bundle(tmp_path / "run" / "model")
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}
    assert bundle.provenance["trained_in"] == "bf16"


def test_prepare_only_builds_the_caches_and_trains_nothing(tmp_path, world_root):
    config = tiny_experiment(tmp_path, world_root, targets__cache_dir=str(tmp_path / "cache"))
    result = pretrain("--config", str(config), "--prepare-only")
    assert "data and targets ready" in result.stdout and "from cache" in result.stdout
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tokens.json", "tokens.npy"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
