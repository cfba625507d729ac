"""Which voxels calibration computes betas for (the candidates), and the subject's final mask.

* ``preprocess.mask`` set: the supplied region mask (native space, on the reference grid) is the mask; no
  selection.
* otherwise: candidates are ``calibrate.search_mask`` (e.g. a posterior mask) or a brain mask of the
  reference volume, and the mask is the candidates whose repeat reliability passes
  (:mod:`calibration.selection`), as real-time MindEye chose its voxels.
"""

import numpy as np

from calibration.selection import brain_mask
from rtdecode.config import Config
from rtdecode.errors import CalibrationError, MaskError
from rtdecode.preprocess.mask import Mask


def candidate_voxels(config: Config, reference: tuple[np.ndarray, np.ndarray]) -> tuple[Mask, str]:
    """The voxels to compute betas for, and how they were chosen ("mask", "search_mask" or "brain_mask")."""
    data, affine = reference
    if config.preprocess.mask is not None:
        return _on_reference(Mask.from_nifti(config.preprocess.mask), reference), "mask"
    if config.calibrate.search_mask is not None:
        return _on_reference(Mask.from_nifti(config.calibrate.search_mask), reference), "search_mask"
    return Mask(brain_mask(data), affine, source="brain mask of the reference volume"), "brain_mask"


def _on_reference(mask: Mask, reference: tuple[np.ndarray, np.ndarray]) -> Mask:
    try:
        mask.check_fits(np.shape(reference[0]), reference[1], reference="the calibration reference volume")
    except MaskError as error:
        raise CalibrationError(
            f"{error}. A supplied mask must lie on the reference grid: give the reference it was drawn on with "
            "--reference (preprocess.reference), or set calibrate.reference_run to the run it was drawn on"
        ) from None
    return mask


def subset_mask(candidates: Mask, indices: np.ndarray) -> Mask:
    """The candidates' voxels at ``indices`` (positions in the candidates' C order) as a mask on the same grid."""
    chosen = np.zeros(candidates.shape, dtype=bool)
    voxels = candidates.voxel_indices[np.asarray(indices, dtype=np.int64)]
    chosen[tuple(voxels.T)] = True
    return Mask(chosen, candidates.affine, source=f"{len(indices)} selected voxels of {candidates.source}")
