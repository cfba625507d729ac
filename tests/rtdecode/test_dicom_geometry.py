import numpy as np
import pytest

from rtdecode.dicom_geometry import (
    frames_to_volume,
    geometry_from_affine,
    mosaic_position,
    slice_position_from_mosaic,
    stacks_along_normal,
    volume_to_frames,
)


def random_affine(rng, flip_slices=False):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag([1.8, 2.0, 2.5 * (-1 if flip_slices else 1)])
    affine[:3, 3] = rng.normal(scale=50, size=3)
    return affine


@pytest.mark.parametrize("flip", [False, True])
def test_affine_round_trip(rng, flip):
    shape = (7, 8, 9)
    for _ in range(20):
        affine = random_affine(rng, flip)
        geometry = geometry_from_affine(affine, shape)
        assert geometry.shape == shape
        np.testing.assert_allclose(geometry.affine(), affine, atol=1e-9)
        assert abs(np.linalg.norm(geometry.row_cosine) - 1) < 1e-12


def test_stacking_direction_follows_the_dicom_normal(rng):
    affine = random_affine(rng)
    geometry = geometry_from_affine(affine, (7, 8, 9))
    normal = np.cross(geometry.row_cosine, geometry.column_cosine)
    along = float(normal @ np.asarray(geometry.slice_step)) > 0
    assert stacks_along_normal(affine) == along
    flipped = affine.copy()
    flipped[:3, 2] *= -1
    assert stacks_along_normal(flipped) != along


def test_sheared_affine_is_refused():
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        geometry_from_affine(affine, (7, 8, 9))


def test_frames_and_volume_are_inverse(rng):
    frames = rng.integers(0, 4000, size=(9, 8, 7))  # (slices, rows, columns)
    volume = frames_to_volume(frames)
    assert volume.shape == (7, 8, 9)
    assert volume[0, 7, 0] == frames[0, 0, 0]  # first pixel of the first frame: bottom row in the volume
    np.testing.assert_array_equal(volume_to_frames(volume), frames)


def test_mosaic_position_inverse(rng):
    geometry = geometry_from_affine(random_affine(rng), (7, 8, 9))
    position = mosaic_position(geometry, 8 * 3, 7 * 3)
    back = slice_position_from_mosaic(
        position,
        np.asarray(geometry.row_cosine),
        np.asarray(geometry.column_cosine),
        geometry.row_spacing_mm,
        geometry.column_spacing_mm,
        extra_rows=16,
        extra_columns=14,
    )
    np.testing.assert_allclose(back, geometry.first_position, atol=1e-9)


def test_dicom_times():
    from rtdecode.ingest.dicom import seconds_of_day

    assert seconds_of_day("142530.25") == pytest.approx(14 * 3600 + 25 * 60 + 30.25)
    assert seconds_of_day("142530.25+0100") == pytest.approx(14 * 3600 + 25 * 60 + 30.25)  # DT offset ignored
    assert seconds_of_day("1425") == 14 * 3600 + 25 * 60
    assert seconds_of_day("") is None and seconds_of_day("noon") is None
