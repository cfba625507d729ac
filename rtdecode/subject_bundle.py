"""The subject bundle: everything ``rtdecode serve --subject ID`` needs, written by ``rtdecode calibrate``.

Layout (``$RTDECODE_HOME/subjects/<id>/bundle/``, format ``rtdecode-subject`` version 1)::

    mask.nii.gz          the selected voxels (uint8) on the reference grid; voxel order is C order (Mask)
    reference.nii.gz     the reference volume (float32) every run is aligned to
    zscore.npz           per-voxel normalisation statistics of the calibration betas (ZScore, "calibration")
    model/               the fine-tuned MindEye2 model bundle (rtdecode.models.bundle), one subject: <id>
    report.json, report.html   the calibration report
    bundle.json          subject, session, voxel count, the [glm] settings and beta kind the model was trained
                         with, file names; written last, so a folder without it is not a bundle

A new calibration of the same subject is written beside the old bundle and swapped in; the old one is kept
as ``bundle-replaced-<time>/`` (nothing is deleted).
"""

import dataclasses
import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from rtdecode.errors import CheckpointError, ModelError, StoreError
from rtdecode.glm.normalise import ZScore
from rtdecode.preprocess.mask import Mask

FORMAT = "rtdecode-subject"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
FILES = {
    "mask": "mask.nii.gz",
    "reference": "reference.nii.gz",
    "zscore": "zscore.npz",
    "model": "model",
    "report_json": "report.json",
    "report_html": "report.html",
}


@dataclasses.dataclass
class SubjectBundle:
    """A loaded subject bundle. ``model`` is a :class:`rtdecode.models.bundle.Bundle`, or None if not loaded."""

    folder: Path
    manifest: dict[str, Any]
    mask: Mask
    reference: tuple[np.ndarray, np.ndarray]  # (data float32, affine)
    zscore: ZScore
    model: Any = None

    @property
    def subject(self) -> str:
        return self.manifest["subject"]

    @property
    def glm(self) -> dict[str, Any]:
        """The [glm] settings the calibration betas were computed with (serve must use the same)."""
        return self.manifest["glm"]

    def path(self, name: str) -> Path:
        return self.folder / FILES[name]


def glm_differences(bundle_glm: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: bundle value != current value`` for every [glm] setting that differs (empty: they agree)."""
    keys = sorted(set(bundle_glm) | set(current))
    return [
        f"glm.{key}: calibrated with {bundle_glm.get(key)!r}, configured {current.get(key)!r}"
        for key in keys
        if bundle_glm.get(key) != current.get(key)
    ]


def write_subject_bundle(
    folder: Path,
    *,
    manifest: dict[str, Any],
    mask: Mask,
    reference: tuple[np.ndarray, np.ndarray],
    zscore: ZScore,
    model_dir: Path,
    report_files: tuple[Path, Path],
) -> Path:
    """Write a complete bundle at ``folder`` (built beside it, then swapped in); return ``folder``.

    ``manifest`` needs ``subject``, ``session``, ``glm`` and ``betas``; the voxel count, format and file
    names are added here. ``model_dir`` (a model bundle) and the report files are copied.
    """
    folder = Path(folder)
    _check_consistent(mask, reference, zscore)
    _check_model(Path(model_dir), manifest["subject"], mask.n_voxels, where=f"model {model_dir}")
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # an earlier write that never finished: not a bundle, safe to drop
    staging.mkdir(parents=True)
    _save_nifti(staging / FILES["mask"], mask.data.astype(np.uint8), mask.affine)
    _save_nifti(staging / FILES["reference"], np.asarray(reference[0], np.float32), reference[1])
    zscore.save(staging / FILES["zscore"])
    shutil.copytree(model_dir, staging / FILES["model"])
    shutil.copy2(report_files[0], staging / FILES["report_json"])
    shutil.copy2(report_files[1], staging / FILES["report_html"])
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "n_voxels": mask.n_voxels,
        "files": FILES,
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (staging / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
    _swap_in(staging, folder)
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    """The bundle's ``bundle.json``; StoreError if the folder is not a complete bundle of this format."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StoreError(
            f"{folder} is not a subject bundle ({MANIFEST} is missing): run `rtdecode calibrate --subject ID "
            "--session N` first"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this rtdecode reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def load_subject_bundle(folder: Path, *, load_model: bool = True, device: str = "cpu") -> SubjectBundle:
    """Read a bundle and check that its parts agree (voxel counts, grids, the model's subject)."""
    from rtdecode.betas import load_reference

    folder = Path(folder)
    manifest = read_manifest(folder)
    missing = [name for name in FILES.values() if not (folder / name).exists()]
    if missing:
        raise StoreError(f"subject bundle {folder} is incomplete: {', '.join(missing)} missing")
    mask = Mask.from_nifti(folder / FILES["mask"])
    reference = load_reference(folder / FILES["reference"])
    zscore = ZScore.load(folder / FILES["zscore"])
    _check_consistent(mask, reference, zscore)
    bundle = SubjectBundle(folder, manifest, mask, reference, zscore)
    _check_model(bundle.path("model"), bundle.subject, mask.n_voxels, where=f"subject bundle {folder}")
    if load_model:
        from rtdecode.models.bundle import load_bundle

        bundle.model = load_bundle(bundle.path("model"), device=device)
    return bundle


def _check_consistent(mask: Mask, reference: tuple[np.ndarray, np.ndarray], zscore: ZScore) -> None:
    mask.check_fits(np.shape(reference[0]), np.asarray(reference[1]), reference="the reference volume")
    if zscore.n_voxels != mask.n_voxels:
        raise StoreError(f"normalisation statistics hold {zscore.n_voxels} voxels; the mask has {mask.n_voxels}")


def _check_model(model_dir: Path, subject: str, n_voxels: int, where: str) -> None:
    """The model bundle has a ridge layer for ``subject`` reading ``n_voxels`` voxels (CheckpointError if not)."""
    from rtdecode.models.bundle import read_bundle_config

    config, _ = read_bundle_config(model_dir)
    try:
        model_voxels = config.n_voxels[config.subject_index(subject)]
    except ModelError as error:  # it lists the model's subjects
        raise CheckpointError(f"{where}: {error}") from None
    if model_voxels != n_voxels:
        raise CheckpointError(f"{where}: the model reads {model_voxels} voxels for {subject}; the mask has {n_voxels}")


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, np.asarray(affine, np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, path)


def _swap_in(staging: Path, folder: Path) -> None:
    if folder.exists():
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
        folder.rename(folder.with_name(f"{folder.name}-replaced-{stamp}"))
    staging.rename(folder)
