"""Starting a run from a model bundle (trainer/finetune.py, spec §4): config, weight loading, identity, a run.

Bundles are tiny random MindEye2 models written as real folders; "fresh" weights are checked against a model
built with the same torch seed and never loaded.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdecode.checkpoint_io import read_safetensors
from rtdecode.errors import TrainError
from rtdecode.models.bundle import PROVENANCE_FILE, WEIGHTS_FILE, file_sha256, read_bundle_config, save_model_bundle
from rtdecode.models.config import MindEye2Config, tiny
from rtdecode.models.mindeye2 import MindEye2
from trainer.config import (
    DataConfig,
    ModelSettings,
    RecipeConfig,
    RunConfig,
    TargetsConfig,
    TrainConfig,
    ValidationConfig,
)
from trainer.data.sessions import Trial, write_session
from trainer.finetune import bundle_identity, fine_tune_config, load_pretrained
from trainer.loop import MODEL_DIR, Pretrainer

TOKENS = (6, 20)  # tiny()'s (clip_tokens, clip_dim)
INIT_SEED = 7  # the fine-tune model's torch seed (the bundle is built with another)


def _write_bundle(folder: Path, config: MindEye2Config, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model_bundle(folder, MindEye2(config), provenance={"source_kind": "random"})


def _seeded_model(config: MindEye2Config) -> MindEye2:
    torch.manual_seed(INIT_SEED)
    return MindEye2(config)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A two-subject pretrained model (s1: 37 voxels, s2: 29), no low-level branch."""
    return _write_bundle(tmp_path / "pretrained", tiny(("s1", "s2"), (37, 29), low_level=False))


def _new_model(bundle_dir: Path, subjects: tuple[str, ...], n_voxels: tuple[int, ...]) -> MindEye2:
    return _seeded_model(fine_tune_config(bundle_dir, subjects, n_voxels, TOKENS))


# ------------------------------------------------------------------------------------------------ config


def test_fine_tune_config_keeps_the_architecture_with_the_new_subject(bundle):
    pretrained, _ = read_bundle_config(bundle)
    tuned = fine_tune_config(bundle, ("new01",), (41,), TOKENS)
    assert tuned.subjects == ("new01",) and tuned.n_voxels == (41,)
    assert tuned.backbone == pretrained.backbone and tuned.prior == pretrained.prior


def test_fine_tune_config_refuses_other_image_tokens(bundle):
    with pytest.raises(TrainError) as error:
        fine_tune_config(bundle, ("new01",), (41,), (16, 24))
    message = str(error.value)
    assert "(6, 20)" in message and "(16, 24)" in message and str(bundle) in message


# ------------------------------------------------------------------------------------------------ weights


def test_load_pretrained_copies_backbone_prior_and_the_first_bias(bundle):
    pretrained = read_safetensors(bundle / WEIGHTS_FILE)
    model = _new_model(bundle, ("new01",), (41,))
    fresh = {k: v.clone() for k, v in _new_model(bundle, ("new01",), (41,)).state_dict().items()}
    assert not torch.equal(fresh["backbone.backbone_linear.weight"], pretrained["backbone.backbone_linear.weight"])

    counts = load_pretrained(model, bundle)

    state = model.state_dict()
    shared = [k for k in state if not k.startswith("ridge.")]
    assert counts == {"loaded": len(shared) + 1, "fresh": 1}
    assert any(k.startswith("backbone.") for k in shared) and any(k.startswith("diffusion_prior.") for k in shared)
    for key in shared:
        assert torch.equal(state[key], pretrained[key]), key
    assert tuple(state["ridge.linears.0.weight"].shape) == (24, 41)
    assert torch.equal(state["ridge.linears.0.weight"], fresh["ridge.linears.0.weight"])  # PyTorch's init, kept
    assert torch.equal(state["ridge.linears.0.bias"], pretrained["ridge.linears.0.bias"])  # the public quirk
    assert not torch.equal(fresh["ridge.linears.0.bias"], pretrained["ridge.linears.0.bias"])


def test_ridge_biases_come_from_the_same_layer_where_the_bundle_has_one(bundle):
    pretrained = read_safetensors(bundle / WEIGHTS_FILE)
    two = _new_model(bundle, ("a", "b"), (41, 13))
    assert load_pretrained(two, bundle)["fresh"] == 2
    assert torch.equal(two.state_dict()["ridge.linears.1.bias"], pretrained["ridge.linears.1.bias"])

    three = _new_model(bundle, ("a", "b", "c"), (41, 13, 17))
    fresh = _new_model(bundle, ("a", "b", "c"), (41, 13, 17)).state_dict()
    assert load_pretrained(three, bundle) == {"loaded": len(fresh) - 4, "fresh": 4}  # 3 weights, layer 2's bias
    state = three.state_dict()
    assert torch.equal(state["ridge.linears.2.bias"], fresh["ridge.linears.2.bias"])
    assert torch.equal(state["ridge.linears.1.bias"], pretrained["ridge.linears.1.bias"])
    for layer in range(3):
        assert torch.equal(state[f"ridge.linears.{layer}.weight"], fresh[f"ridge.linears.{layer}.weight"])


def test_bundle_tensors_the_model_lacks_are_ignored(tmp_path):
    """A low-level bundle fine-tuned without the branch (no SD-VAE latents): its low-level tensors are dropped."""
    with_low = _write_bundle(tmp_path / "low", tiny(("s1",), (37,), low_level=True))
    tuned = fine_tune_config(with_low, ("new01",), (41,), TOKENS)
    model = _seeded_model(dataclasses.replace(tuned, backbone=dataclasses.replace(tuned.backbone, low_level=None)))
    assert load_pretrained(model, with_low) == {"loaded": len(model.state_dict()) - 1, "fresh": 1}
    pretrained = read_safetensors(with_low / WEIGHTS_FILE)
    assert torch.equal(model.state_dict()["backbone.clip_proj.8.weight"], pretrained["backbone.clip_proj.8.weight"])


def test_model_tensors_the_bundle_lacks_are_refused(tmp_path):
    no_low = _write_bundle(tmp_path / "nolow", tiny(("s1",), (37,), low_level=False))
    model = _seeded_model(tiny(("new01",), (41,), low_level=True))
    with pytest.raises(TrainError, match=r"backbone\.blin1\.weight is missing; this model needs \(72, 24\)"):
        load_pretrained(model, no_low)


def test_a_bundle_of_another_backbone_is_refused_naming_the_tensor(tmp_path):
    config = tiny(("s1", "s2"), (37, 29), low_level=False)
    fewer_blocks = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, n_blocks=3))
    bundle = _write_bundle(tmp_path / "blocks", fewer_blocks)
    with pytest.raises(TrainError) as error:
        load_pretrained(_seeded_model(dataclasses.replace(config, subjects=("new01",), n_voxels=(41,))), bundle)
    assert "backbone.mixer_blocks1.3.0.weight is missing" in str(error.value) and str(bundle) in str(error.value)

    wider = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, hidden_dim=32))
    bundle = _write_bundle(tmp_path / "wider", wider)
    with pytest.raises(TrainError) as error:
        load_pretrained(_seeded_model(dataclasses.replace(config, subjects=("new01",), n_voxels=(41,))), bundle)
    assert "is shape (32" in str(error.value) and "this model needs (24" in str(error.value)


def test_a_folder_without_weights_is_refused(bundle):
    model = _new_model(bundle, ("new01",), (41,))
    (bundle / WEIGHTS_FILE).unlink()
    with pytest.raises(TrainError, match=f"{WEIGHTS_FILE} is missing"):
        load_pretrained(model, bundle)


# ------------------------------------------------------------------------------------------------ identity


def test_bundle_identity_is_the_weights_checksum_and_follows_the_weights(bundle):
    identity = bundle_identity(bundle)
    recorded = json.loads((bundle / PROVENANCE_FILE).read_text())["weights_sha256"]
    assert identity == recorded == file_sha256(bundle / WEIGHTS_FILE)
    (bundle / PROVENANCE_FILE).unlink()
    assert bundle_identity(bundle) == identity  # without provenance: the file's checksum

    config, _ = read_bundle_config(bundle)
    torch.manual_seed(1)
    save_model_bundle(bundle, MindEye2(config), provenance={"source_kind": "random"}, overwrite=True)
    assert bundle_identity(bundle) != identity


# ------------------------------------------------------------------------------------------------ a run

TINY_TOWER = {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12, "mlp_ratio": 2.0}
RUN_TOKENS = (16, 24)  # the tower's (32 / 8)^2 patch tokens of width 24


def _session_root(root: Path, n_voxels: int) -> Path:
    """One session of ``new01``: 16 train images, 4 test images shown 3 times (32 px)."""
    rng = np.random.default_rng(3)
    plan = [(f"train{i:02d}", "train") for i in range(16)] + [(f"test{i}", "test") for i in range(4)] * 3
    trials = [Trial(f"run-1_{k}", 1, stimulus, split) for k, (stimulus, split) in enumerate(plan)]
    images = {stimulus: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for stimulus, _ in plan}
    betas = rng.standard_normal((len(plan), n_voxels))
    write_session(root / "new01" / "ses-1", subject="new01", session=1, betas=betas, trials=trials, images=images)
    return root


def test_pretrainer_fine_tunes_from_a_bundle(tmp_path):
    base = tiny(("s1", "s2"), (37, 29), low_level=False)
    backbone = dataclasses.replace(base.backbone, clip_tokens=RUN_TOKENS[0], clip_dim=RUN_TOKENS[1])
    prior = dataclasses.replace(base.prior, dim=24, dim_head=12, heads=2, n_tokens=RUN_TOKENS[0])
    start = _write_bundle(tmp_path / "start", dataclasses.replace(base, backbone=backbone, prior=prior))
    train = TrainConfig(
        run=RunConfig(out_dir=tmp_path / "run", cpu=True, progress=False, checkpoint_every_epochs=1),
        data=DataConfig(source="sessions", root=_session_root(tmp_path / "sessions", 41), image_size_px=32),
        model=ModelSettings(preset="tiny", init_from=start),
        targets=TargetsConfig(embedder_random={"seed": 0, "embed_dim": 16, "vision_cfg": TINY_TOWER}),
        recipe=RecipeConfig(epochs=1, batch_per_subject=4, samples_per_epoch=16),
        validation=ValidationConfig(n_way=4, n_draws=1),
    )
    (record,) = Pretrainer(train).fit()
    assert np.isfinite(record.loss["total"])

    written, _ = read_bundle_config(tmp_path / "run" / MODEL_DIR)
    assert written.subjects == ("new01",) and written.n_voxels == (41,)
    assert written.backbone == backbone and written.prior == prior
    before = read_safetensors(start / WEIGHTS_FILE)
    after = read_safetensors(tmp_path / "run" / MODEL_DIR / WEIGHTS_FILE)
    changes = {k: (after[k].float() - before[k].float()).abs().max().item() for k in after if k.startswith("backbone.")}
    assert max(changes.values()) > 0  # it trained
    # it started from the bundle: 4 small steps move no weight far (a fresh init differs by ~0.1 or more)
    assert max(changes.values()) < 0.01, max(changes.items(), key=lambda item: item[1])
