"""The subject bundle (rtdecode/subject_bundle.py) written and read back as real files, and what a load refuses."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdecode.errors import CheckpointError, MaskError, StoreError
from rtdecode.glm.normalise import ZScore
from rtdecode.models.bundle import load_bundle, save_model_bundle
from rtdecode.models.config import tiny
from rtdecode.models.mindeye2 import MindEye2
from rtdecode.preprocess.mask import Mask
from rtdecode.subject_bundle import (
    FILES,
    MANIFEST,
    SubjectBundle,
    glm_differences,
    load_subject_bundle,
    read_manifest,
    write_subject_bundle,
)

SHAPE = (7, 8, 9)
AFFINE = np.array(  # float32-exact values: the NIfTI header stores the affine in float32
    [[2.0, 0.0, 0.0, -7.0], [0.0, 2.0, 0.0, -8.5], [0.0, 0.0, 2.5, -10.0], [0.0, 0.0, 0.0, 1.0]]
)
GLM = {"hrf": "glover", "drift_order": 3, "motion_regressors": True}


def _mask() -> Mask:
    data = np.zeros(SHAPE, dtype=bool)
    data[2:5, 3:6, 1:4] = True  # 27 voxels
    data[6, 7, 8] = True
    return Mask(data, AFFINE)


def _model(folder: Path, subject: str, n_voxels: int) -> Path:
    torch.manual_seed(0)
    model = MindEye2(tiny((subject,), (n_voxels,), low_level=False))
    return save_model_bundle(folder, model, provenance={"source_kind": "random"})


def _zscore(n_voxels: int, seed: int = 0) -> ZScore:
    return ZScore.from_betas(np.random.default_rng(seed).standard_normal((12, n_voxels)) * 3 + 1)


def _reports(folder: Path, tag: str = "first") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"tag": tag}))
    (folder / "report.html").write_text(f"<html><body>{tag}</body></html>")
    return folder / "report.json", folder / "report.html"


@pytest.fixture
def parts(tmp_path: Path) -> dict:
    mask = _mask()
    reference = (np.random.default_rng(1).uniform(100, 900, SHAPE).astype(np.float32), AFFINE)
    return {
        "manifest": {"subject": "new01", "session": 1, "glm": GLM, "betas": "lss"},
        "mask": mask,
        "reference": reference,
        "zscore": _zscore(mask.n_voxels),
        "model_dir": _model(tmp_path / "made" / "model", "new01", mask.n_voxels),
        "report_files": _reports(tmp_path / "made"),
    }


@pytest.fixture
def written(tmp_path: Path, parts: dict) -> Path:
    return write_subject_bundle(tmp_path / "subjects" / "new01" / "bundle", **parts)


def test_round_trip(written, parts):
    assert sorted(p.name for p in written.parent.iterdir()) == ["bundle"]  # no staging folder left
    bundle = load_subject_bundle(written)
    assert isinstance(bundle, SubjectBundle) and bundle.folder == written
    assert bundle.subject == "new01" and bundle.glm == GLM
    assert bundle.manifest["session"] == 1 and bundle.manifest["betas"] == "lss"
    assert bundle.manifest["n_voxels"] == 28 and bundle.manifest["files"] == FILES

    np.testing.assert_array_equal(bundle.mask.data, parts["mask"].data)
    np.testing.assert_array_equal(bundle.mask.affine, AFFINE)
    data, affine = bundle.reference
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, parts["reference"][0])
    np.testing.assert_array_equal(affine, AFFINE)
    assert bundle.zscore.method == "calibration" and bundle.zscore.count == 12
    np.testing.assert_array_equal(bundle.zscore.mean, parts["zscore"].mean)
    np.testing.assert_array_equal(bundle.zscore.m2, parts["zscore"].m2)

    assert bundle.model.config.subjects == ("new01",) and bundle.model.config.n_voxels == (28,)
    original = load_bundle(parts["model_dir"]).model.state_dict()
    for key, tensor in bundle.model.model.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    assert (bundle.path("report_json")).read_text() == parts["report_files"][0].read_text()
    assert (bundle.path("report_html")).read_text() == parts["report_files"][1].read_text()

    assert load_subject_bundle(written, load_model=False).model is None


def test_writing_again_keeps_the_old_bundle(written, parts, tmp_path):
    again = {**parts, "zscore": _zscore(28, seed=5), "report_files": _reports(tmp_path / "second", "second")}
    write_subject_bundle(written, **again)
    siblings = sorted(p.name for p in written.parent.iterdir())
    assert len(siblings) == 2 and siblings[0] == "bundle"
    assert siblings[1].startswith("bundle-replaced-")
    old = written.parent / siblings[1]
    assert json.loads((old / FILES["report_json"]).read_text()) == {"tag": "first"}
    assert json.loads((written / FILES["report_json"]).read_text()) == {"tag": "second"}
    np.testing.assert_array_equal(load_subject_bundle(old, load_model=False).zscore.mean, parts["zscore"].mean)
    np.testing.assert_array_equal(load_subject_bundle(written, load_model=False).zscore.mean, again["zscore"].mean)


# ------------------------------------------------------------------------------------------------ refusals


def test_a_folder_without_a_manifest_is_not_a_bundle(tmp_path):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(StoreError, match=rf"{MANIFEST} is missing\): run `rtdecode calibrate"):
        load_subject_bundle(tmp_path / "bundle")


@pytest.mark.parametrize("name", ["mask.nii.gz", "zscore.npz", "model", "report.html"])
def test_a_missing_file_is_named(written, name):
    path = written / name
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    with pytest.raises(StoreError, match=rf"incomplete: {name} missing"):
        load_subject_bundle(written)


def test_statistics_of_another_voxel_count_are_refused(written, parts, tmp_path):
    with pytest.raises(StoreError, match="statistics hold 27 voxels; the mask has 28"):
        write_subject_bundle(tmp_path / "other", **{**parts, "zscore": _zscore(27)})
    _zscore(30).save(written / FILES["zscore"])
    with pytest.raises(StoreError, match="statistics hold 30 voxels; the mask has 28"):
        load_subject_bundle(written, load_model=False)


def test_a_reference_on_another_grid_is_refused(parts, tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(MaskError, match="affines differ"):
        write_subject_bundle(tmp_path / "other", **{**parts, "reference": (parts["reference"][0], shifted)})


def test_a_model_of_another_subject_is_refused(parts, tmp_path):
    other = _model(tmp_path / "other-model", "someone", 28)
    with pytest.raises(CheckpointError, match=r"unknown subject 'new01'; this model has \['someone'\]"):
        write_subject_bundle(tmp_path / "refused", **{**parts, "model_dir": other})
    folder = write_subject_bundle(tmp_path / "bundle", **parts)
    shutil.rmtree(folder / "model")
    shutil.copytree(other, folder / "model")  # swapped after writing: the load refuses it too
    with pytest.raises(CheckpointError, match=r"unknown subject 'new01'; this model has \['someone'\]"):
        load_subject_bundle(folder, load_model=False)


def test_a_model_of_another_voxel_count_is_refused(parts, tmp_path):
    other = _model(tmp_path / "other-model", "new01", 29)
    with pytest.raises(CheckpointError, match="the model reads 29 voxels for new01; the mask has 28"):
        write_subject_bundle(tmp_path / "refused", **{**parts, "model_dir": other})
    folder = write_subject_bundle(tmp_path / "bundle", **parts)
    shutil.rmtree(folder / "model")
    shutil.copytree(other, folder / "model")
    with pytest.raises(CheckpointError, match="the model reads 29 voxels for new01; the mask has 28"):
        load_subject_bundle(folder, load_model=False)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("format_version", 2, "format 'rtdecode-subject' version 2"), ("format", "other", "format 'other' version 1")],
)
def test_another_format_is_refused(written, key, value, shown):
    path = written / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(StoreError, match="this rtdecode reads 'rtdecode-subject' version 1"):
        read_manifest(written)
    with pytest.raises(StoreError, match=f"{shown};"):
        load_subject_bundle(written)


def test_a_broken_manifest_is_refused(written):
    (written / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        load_subject_bundle(written)


# ------------------------------------------------------------------------------------------------ glm settings


def test_glm_differences_lists_only_differing_keys():
    assert glm_differences(GLM, dict(GLM)) == []
    current = {**GLM, "drift_order": 2, "smoothing_fwhm_mm": 4.0}
    del current["hrf"]
    assert glm_differences(GLM, current) == [
        "glm.drift_order: calibrated with 3, configured 2",
        "glm.hrf: calibrated with 'glover', configured None",
        "glm.smoothing_fwhm_mm: calibrated with None, configured 4.0",
    ]
