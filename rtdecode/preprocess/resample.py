"""Trilinear sampling of a volume at world points, with torch ``grid_sample`` (CPU or CUDA).

A volume is held as a tensor of shape ``(1, 1, n_z, n_y, n_x)``: the Fortran-ordered array transposed, so
no copy is made for a :class:`~rtdecode.records.Volume` and ``grid_sample``'s coordinate ``(x, y, z)`` is the
voxel index ``(i, j, k)`` along array axes ``(0, 1, 2)``, scaled to ``[-1, 1]`` (``align_corners=True``: -1
and 1 are the centres of the first and last voxels).

Out of the field of view: a point beyond the centre of an edge voxel takes the value of the nearest edge
voxel (``padding_mode="border"``), never zero, so a voxel that moves out of the FOV keeps a plausible
intensity instead of a step to 0. Every sampler counts those points (``n_out_of_fov``) so callers can report
them.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from rtdecode.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
_FOV_TOLERANCE = 1e-5  # in grid units: points this close outside an edge centre still count as inside


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when torch sees a GPU, else CPU; ``"cpu"`` and ``"cuda"`` as named.

    Raises
    ------
    ConfigError
        ``device`` is not one of :data:`DEVICES`, or is ``"cuda"`` where torch has no CUDA device.
    """
    if device not in DEVICES:
        raise ConfigError(f"preprocess device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("preprocess device 'cuda' was asked for but torch sees no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def volume_tensor(data: np.ndarray, device: torch.device) -> torch.Tensor:
    """A 3D array as a float32 ``(1, 1, n_z, n_y, n_x)`` tensor (no copy for a Fortran-ordered float32 array).

    The tensor may share memory with ``data``; it is only read, so a read-only array is fine.
    """
    fortran = np.asfortranarray(data, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(fortran.T)
    return tensor.to(device)[None, None]


def voxel_to_grid(shape) -> np.ndarray:
    """4x4 matrix: voxel index ``(i, j, k)`` -> ``grid_sample`` coordinates ``(x, y, z)`` in ``[-1, 1]``."""
    scale = 2.0 / (np.asarray(shape[:3], dtype=np.float64) - 1.0)
    matrix = np.diag([*scale, 1.0])
    matrix[:3, 3] = -1.0
    return matrix


def world_to_grid(shape, affine: np.ndarray) -> np.ndarray:
    """4x4 matrix: world mm -> ``grid_sample`` coordinates of a volume with this shape and affine."""
    return voxel_to_grid(shape) @ np.linalg.inv(affine)


def points_tensor(points: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(n_points, 3)`` coordinates as a homogeneous ``(n_points, 4)`` float32 tensor."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return torch.as_tensor(homogeneous, dtype=torch.float32, device=device)


def map_points(points_h: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """A 4x4 matrix (float64, composed on the host) applied to ``(n_points, 4)`` homogeneous points.

    Returns ``(n_points, 3)``: the first three rows of ``matrix @ point`` for each point.
    """
    rows = torch.as_tensor(matrix[:3].T, dtype=torch.float32, device=points_h.device)
    return points_h @ rows


def sample_grid(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear values ``(n_points,)`` of ``volume`` at ``(n_points, 3)`` grid coordinates (border outside the FOV)."""
    values = F.grid_sample(
        volume, grid.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=True
    )
    return values.view(-1)


def inside_fov(grid: torch.Tensor) -> torch.Tensor:
    """Boolean ``(n_points,)``: the grid point lies within the volume's field of view (edge centres included)."""
    return (grid.abs() <= 1.0 + _FOV_TOLERANCE).all(dim=-1)


def sample_world(data: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, device: str = "cpu"):
    """Trilinear values of a volume at world points.

    Parameters
    ----------
    data : (n_x, n_y, n_z) array
    affine : (4, 4) array
        Voxel index -> world mm of ``data``.
    points_mm : (n_points, 3) array
        World coordinates to sample at.
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    values : (n_points,) float32
    n_out_of_fov : int
        Points outside the field of view (they took the nearest edge voxel's value).
    """
    torch_device = resolve_device(device)
    grid = map_points(
        points_tensor(np.asarray(points_mm, dtype=np.float64), torch_device), world_to_grid(data.shape, affine)
    )
    values = sample_grid(volume_tensor(data, torch_device), grid)
    return values.cpu().numpy(), int((~inside_fov(grid)).sum())


def resample_volume(
    data: np.ndarray,
    affine: np.ndarray,
    target_shape,
    target_affine: np.ndarray,
    transform: np.ndarray | None = None,
    device: str = "cpu",
):
    """Resample a whole volume onto a target grid (trilinear, border outside the FOV).

    Parameters
    ----------
    data : (n_x, n_y, n_z) array
    affine : (4, 4) array
        Voxel index -> world mm of ``data``.
    target_shape : (3,) ints
    target_affine : (4, 4) array
        Voxel index -> world mm of the target grid.
    transform : (4, 4) array, optional
        World map from the target's space to ``data``'s space (target world mm -> source world mm); identity
        when omitted (the two grids share world space).
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    resampled : target_shape float32, Fortran order
    n_out_of_fov : int
        Target voxels that fell outside ``data``'s field of view.
    """
    torch_device = resolve_device(device)
    world = np.eye(4) if transform is None else np.asarray(transform, dtype=np.float64)
    theta = world_to_grid(data.shape, affine) @ world @ target_affine @ np.linalg.inv(voxel_to_grid(target_shape))
    size = (1, 1, *reversed(tuple(int(n) for n in target_shape)))
    theta_t = torch.as_tensor(theta[None, :3], dtype=torch.float32, device=torch_device)
    grid = F.affine_grid(theta_t, size, align_corners=True)
    volume = volume_tensor(data, torch_device)
    resampled = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    n_out = int((~inside_fov(grid.view(-1, 3))).sum())
    return resampled[0, 0].cpu().numpy().T, n_out
