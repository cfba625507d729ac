"""Builders for the preprocessing tests: Volume records and random motion."""

from pathlib import Path

import numpy as np

from rtdecode.records import Volume


def make_volume(data, affine, run_index=1, volume_index=0):
    """A Volume record as ingest delivers it (Fortran-ordered float32)."""
    return Volume(
        data=np.asfortranarray(data, dtype=np.float32),
        affine=np.asarray(affine, dtype=np.float64),
        tr_s=1.6,
        acquisition_time_s=None,
        slice_times_s=None,
        series_number=10 + run_index,
        run_index=run_index,
        volume_index=volume_index,
        source=Path(f"/scanner/run{run_index}/vol_{volume_index:04d}.nii"),
        timestamps={"available": 1.0},
    )


def random_params(rng, max_trans_mm=3.0, max_rot_deg=3.0):
    """Six motion parameters drawn uniformly within +-max (mm, then radians)."""
    trans = rng.uniform(-max_trans_mm, max_trans_mm, 3)
    return np.concatenate([trans, np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, 3))])
