"""Per-subject ridge layers: voxels of one subject -> the shared hidden space (spec §1.1).

MindEye2's "shared-subject functional alignment" is one ``nn.Linear(n_voxels, hidden)`` per subject,
kept in a ``ModuleList`` called ``linears`` in subject order, so published checkpoints load under
``ridge.linears.{i}.{weight,bias}``. The "ridge" penalty is only AdamW weight decay during training;
there is no closed-form solve here.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rtdecode.errors import ModelError


class RidgeRegression(nn.Module):
    """One linear map per subject; subject ``i`` uses ``linears[i]`` (order of the config's subjects)."""

    def __init__(self, n_voxels: Sequence[int], hidden_dim: int) -> None:
        super().__init__()
        self.n_voxels = tuple(n_voxels)
        self.hidden_dim = hidden_dim
        if not self.n_voxels:
            raise ModelError("ridge: n_voxels must name at least one subject, got an empty sequence")
        for index, count in enumerate(self.n_voxels):
            if not isinstance(count, int) or count < 1:
                raise ModelError(f"ridge: n_voxels[{index}] must be a positive integer, got {count!r}")
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ModelError(f"ridge: hidden_dim must be a positive integer, got {hidden_dim!r}")
        self.linears = nn.ModuleList(nn.Linear(count, hidden_dim) for count in self.n_voxels)

    def forward(self, voxels: Tensor, subject_index: int) -> Tensor:
        """(B, n_voxels) or (B, 1, n_voxels) of subject ``subject_index`` -> (B, 1, hidden_dim).

        The public code applies the layer to ``x[:, 0]`` and unsqueezes the result back (spec §1.1);
        the singleton axis is the backbone's ``seq_len``.
        """
        n_voxels = self._expected_voxels(subject_index)
        flat = self._flatten(voxels, subject_index, n_voxels)
        return self.linears[subject_index](flat).unsqueeze(1)

    def _expected_voxels(self, subject_index: int) -> int:
        """Voxel count of subject ``subject_index``, or a ModelError naming the valid range."""
        valid = isinstance(subject_index, int) and not isinstance(subject_index, bool)
        if not valid or not 0 <= subject_index < len(self.n_voxels):
            raise ModelError(
                f"ridge: subject_index must be an int in [0, {len(self.n_voxels)}) "
                f"(one per subject, n_voxels={self.n_voxels}), got {subject_index!r}"
            )
        return self.n_voxels[subject_index]

    @staticmethod
    def _flatten(voxels: Tensor, subject_index: int, n_voxels: int) -> Tensor:
        """Check the input's shape and drop the singleton sequence axis."""
        if not isinstance(voxels, torch.Tensor):
            raise ModelError(f"ridge: voxels must be a torch.Tensor, got {type(voxels).__name__}")
        shape = tuple(voxels.shape)
        if voxels.ndim == 3 and shape[1] == 1 and shape[2] == n_voxels:
            return voxels[:, 0]
        if voxels.ndim == 2 and shape[1] == n_voxels:
            return voxels
        raise ModelError(
            f"ridge: subject index {subject_index} expects voxels of shape (B, {n_voxels}) or "
            f"(B, 1, {n_voxels}), got {shape}"
        )
