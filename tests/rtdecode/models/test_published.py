"""Import of published-layout checkpoints: round trip, geometry inference, clear errors, safe loading."""

import argparse
import collections
import dataclasses
import json
import os

import pytest
import torch

from rtdecode.errors import CheckpointError
from rtdecode.models.bundle import load_bundle
from rtdecode.models.config import NSD_VOXELS, ConverterConfig, MindEye2Config, tiny
from rtdecode.models.converter import CLIPConverter
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.models.published import import_mindeye2, infer_config


def published_checkpoint(state: dict, path, epoch: int = 149):
    """A file laid out as Train.ipynb saves last.pth (spec §2.1): the weights under model_state_dict."""
    torch.save(
        {
            "epoch": epoch,
            "model_state_dict": state,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 3e-4, "params": [0, 1]}]},
            "lr_scheduler": {"last_epoch": 10, "_step_count": 11},
            "train_losses": [1.5, 1.2],
            "test_losses": [1.6],
            "lrs": [3e-4],
        },
        path,
    )
    return path


def random_model(config: MindEye2Config, seed: int = 0) -> MindEye2:
    torch.manual_seed(seed)
    model = MindEye2(config).eval()
    with torch.no_grad():  # non-default norms and biases, so a load that drops them shows
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def outputs(model: MindEye2, subject: str, n_voxels: int):
    torch.manual_seed(3)
    voxels = torch.randn(2, n_voxels)
    with torch.no_grad():
        out = model.embed(voxels, subject)
    return out, model.sample_prior(out.backbone, n_steps=20, seed=5)


@pytest.mark.parametrize("low_level", [True, False], ids=["blurry", "nolow"])
def test_import_round_trip_gives_the_same_outputs(tmp_path, low_level):
    model = random_model(tiny(low_level=low_level))
    source = published_checkpoint(model.state_dict(), tmp_path / "last.pth")

    folder = import_mindeye2(source, tmp_path / "bundle", subjects=["s1", "s2"])
    loaded = load_bundle(folder).model

    assert loaded.config == model.config
    for subject, n_voxels in (("s1", 37), ("s2", 29)):
        (want, want_prior), (got, got_prior) = outputs(model, subject, n_voxels), outputs(loaded, subject, n_voxels)
        for a, b in zip(want, got, strict=True):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(want_prior, got_prior, rtol=0, atol=0)
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["epoch"] == 149 and provenance["source_kind"] == "torch"
    assert len(provenance["source_sha256"]) == 64


def test_multi_subject_ridge_order_and_nsd_names_are_read_from_the_tensors():
    held_out = "subj01"
    names = [s for s in NSD_VOXELS if s != held_out]
    config = tiny(subjects=names, n_voxels=[NSD_VOXELS[s] for s in names])
    with torch.device("meta"):
        state = MindEye2(config).state_dict()
    inferred = infer_config(state)
    assert inferred.subjects == tuple(names)  # from the nsdgeneral voxel counts, in checkpoint order
    assert inferred == config


def test_unknown_voxel_counts_get_generic_names_and_wrapper_prefixes_are_removed(tmp_path):
    model = random_model(tiny())
    state = collections.OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    torch.save(state, tmp_path / "bare.pth")  # a bare, DDP-wrapped state dict
    folder = import_mindeye2(tmp_path / "bare.pth", tmp_path / "bundle")
    assert load_bundle(folder).config.subjects == ("subject0", "subject1")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("backbone.clip_proj.5.weight"), r"1 missing key\(s\):\s+backbone\.clip_proj\.5\.weight"),
        (
            lambda s: s.__setitem__("backbone.extra.weight", torch.zeros(3)),
            r"1 unexpected key\(s\):\s+backbone\.extra\.weight",
        ),
        (
            lambda s: s.__setitem__("backbone.mixer_blocks1.2.1.0.weight", torch.zeros(24, 23)),
            r"mis-shaped key\(s\):\s+backbone\.mixer_blocks1\.2\.1\.0\.weight: expected \(24, 24\), found \(24, 23\)",
        ),
        (
            lambda s: s.pop("diffusion_prior.net.causal_transformer.layers.1.0.to_q.weight"),
            r"missing key\(s\):\s+diffusion_prior\.net\.causal_transformer\.layers\.1\.0\.to_q\.weight",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped", "missing-prior"],
)
def test_key_and_shape_mismatches_are_listed(tmp_path, edit, message):
    state = dict(random_model(tiny()).state_dict())
    edit(state)
    source = published_checkpoint(state, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match=message) as caught:
        import_mindeye2(source, tmp_path / "bundle", subjects=["s1", "s2"])
    assert str(source) in str(caught.value)
    assert not (tmp_path / "bundle").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    state = dict(random_model(tiny()).state_dict())
    state.pop("backbone.clip_proj.5.weight")
    state["backbone.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*1 unexpected"):
        import_mindeye2(published_checkpoint(state, tmp_path / "last.pth"), tmp_path / "bundle")


class LeavesMark:
    """An object whose unpickling would run our code (``__setstate__`` writes a file): a stand-in must not."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        open(state["marker"], "w").close()
        self.__dict__.update(state)


class RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


def test_objects_beside_the_weights_load_inert_and_run_nothing(tmp_path):
    """Train.ipynb's last.pth may hold an lr-scheduler state (torch<=2.1 OneCycleLR pickles a bound method) or args."""
    marker = tmp_path / "ran"
    model = random_model(tiny())
    payload = {"model_state_dict": model.state_dict(), "args": argparse.Namespace(lr=3e-4), "x": LeavesMark(marker)}
    torch.save(payload, tmp_path / "last.pth")
    folder = import_mindeye2(tmp_path / "last.pth", tmp_path / "bundle", subjects=["s1", "s2"])
    assert not marker.exists()
    assert load_bundle(folder).config == model.config


def test_objects_among_the_weights_are_refused(tmp_path):
    marker = tmp_path / "ran"
    state = {**random_model(tiny()).state_dict(), "backbone.bnorm.weight": LeavesMark(marker)}
    torch.save({"model_state_dict": state}, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['backbone\.bnorm\.weight'\]"):
        import_mindeye2(tmp_path / "last.pth", tmp_path / "bundle")
    assert not marker.exists()


def test_a_checkpoint_that_calls_the_shell_is_refused(tmp_path):
    torch.save({"model_state_dict": random_model(tiny()).state_dict(), "x": RunsShell()}, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match=r"refused by the safe loader \(weights_only=True\):.*posix\.system"):
        import_mindeye2(tmp_path / "last.pth", tmp_path / "bundle")


def test_a_file_that_is_not_a_mindeye2_model_is_named(tmp_path):
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a MindEye2 model_state_dict"):
        import_mindeye2(tmp_path / "other.pth", tmp_path / "bundle")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"junk\.pth: (not a readable torch checkpoint|refused by the safe loader)"
    ):
        import_mindeye2(tmp_path / "junk.pth", tmp_path / "bundle")


def test_wrong_number_of_subject_names(tmp_path):
    source = published_checkpoint(random_model(tiny()).state_dict(), tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match=r"--subjects names 1 subject\(s\) \['a'\].*2 ridge layer\(s\)"):
        import_mindeye2(source, tmp_path / "bundle", subjects=["a"])


def test_converter_is_imported_into_the_bundle(tmp_path):
    torch.manual_seed(1)
    converter = CLIPConverter(ConverterConfig(in_tokens=6, out_tokens=7, in_dim=20, out_dim=11))
    torch.save({"epoch": 8, "model_state_dict": converter.state_dict()}, tmp_path / "bigG_to_L_epoch8.pth")
    source = published_checkpoint(random_model(tiny()).state_dict(), tmp_path / "last.pth")

    folder = import_mindeye2(source, tmp_path / "bundle", converter=tmp_path / "bigG_to_L_epoch8.pth")
    loaded = load_bundle(folder).converter

    tokens = torch.randn(2, 6, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), converter(tokens), rtol=0, atol=0)
    assert loaded.config == ConverterConfig(in_tokens=6, out_tokens=7, in_dim=20, out_dim=11)


def test_import_can_cast_and_refuses_to_overwrite(tmp_path):
    source = published_checkpoint(random_model(tiny()).state_dict(), tmp_path / "last.pth")
    folder = import_mindeye2(source, tmp_path / "bundle", dtype="bf16")
    assert next(load_bundle(folder).model.parameters()).dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="already holds a bundle"):
        import_mindeye2(source, tmp_path / "bundle")
    import_mindeye2(source, tmp_path / "bundle", overwrite=True)


def zero_layout(model: MindEye2):
    """A MindEye2 model's tensors as DeepSpeed keeps them: one trainable group, frozen params, buffers, aliases."""
    from tests.rtdecode.models.test_zero import TinyModel

    params = dict(model.named_parameters())  # the shared rotary table once, under layer 0
    shared = {key: "diffusion_prior.net.causal_transformer.layers.0.0.rotary_emb.freqs" for key in model.state_dict()}
    return TinyModel(
        groups=[{name: p.detach().clone() for name, p in params.items() if p.requires_grad}],
        frozen={name: p.detach().clone() for name, p in params.items() if not p.requires_grad},
        buffers={name: b.clone() for name, b in model.named_buffers()},
        shared={
            key: source for key, source in shared.items() if key.endswith("rotary_emb.freqs") and key not in params
        },
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_import_from_a_deepspeed_zero_folder(tmp_path, stage):
    """Stage 1 saves no frozen parameters: the rotary tables are recomputed and the provenance says so."""
    from tests.rtdecode.models.test_zero import write_zero_checkpoint

    config = tiny()  # with the public rotary width, min(32, dim_head): what a stage-1 import must assume
    model = random_model(dataclasses.replace(config, prior=dataclasses.replace(config.prior, rotary_dim_max=32)))
    folder = write_zero_checkpoint(tmp_path / "ckpt", zero_layout(model), stage, 2, tag="last")
    (folder / "latest").unlink()  # the public layout: outdir/last, read with tag="last"
    with pytest.raises(CheckpointError, match="latest"):
        import_mindeye2(folder, tmp_path / "bundle", subjects=["s1", "s2"])

    bundle = import_mindeye2(folder, tmp_path / "bundle", subjects=["s1", "s2"], tag="last")

    loaded = load_bundle(bundle).model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    provenance = json.loads((bundle / "provenance.json").read_text())
    assert provenance["source_kind"] == "deepspeed-zero"
    assert len(provenance.get("filled_keys", [])) == (2 if stage == 1 else 0)  # tiny prior depth 2
