"""bigG -> CLIP-L token converter for captioning (spec §2.4, published as ``bigG_to_L_epoch8.pth``).

Two Linears: ``linear1`` mixes tokens (256 -> 257, applied over the transposed token axis), then ``linear2``
maps features (1664 -> 1024). The output stands in for CLIP ViT-L/14's 257x1024 vision tokens fed to
GIT-large-coco. Keys ``linear1.{weight,bias}`` and ``linear2.{weight,bias}`` match the published file.
"""

import torch
from torch import Tensor, nn

from rtdecode.errors import ModelError
from rtdecode.models.config import ConverterConfig


class CLIPConverter(nn.Module):
    """(B, in_tokens, in_dim) prior output -> (B, out_tokens, out_dim) CLIP-L-like tokens."""

    def __init__(self, config: ConverterConfig) -> None:
        super().__init__()
        self.config = config
        self.linear1 = nn.Linear(config.in_tokens, config.out_tokens)
        self.linear2 = nn.Linear(config.in_dim, config.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Transpose, ``linear1`` over tokens, transpose back, ``linear2`` over features."""
        self._check_input(x)
        mixed = self.linear1(x.transpose(1, 2)).transpose(1, 2)
        return self.linear2(mixed)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.config.in_tokens, self.config.in_dim)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelError(f"converter: input must have shape (B, {expected[0]}, {expected[1]}), got {shape}")
