"""MindEye2: the container the published checkpoints were saved from, and the inference API.

The module tree is the public one (spec §1.1): three children ``ridge``, ``backbone`` and
``diffusion_prior``, so a published ``model_state_dict`` loads with ``strict=True`` and no renaming.

Inference, one subject at a time::

    model = load_bundle(folder).model.eval()
    out = model.embed(betas, subject="subj01")      # BrainOutputs: backbone, clip_voxels, low-level latent
    image_tokens = model.sample_prior(out.backbone, n_steps=20, seed=0)   # ~ bigG tokens (B, 256, 1664)
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rtdecode.errors import ModelError
from rtdecode.models.backbone import BrainNetwork, BrainOutputs
from rtdecode.models.config import MindEye2Config
from rtdecode.models.prior import DiffusionPrior, StepNet
from rtdecode.models.ridge import RidgeRegression


class MindEye2(nn.Module):
    """Ridge (one linear per subject) -> BrainNetwork backbone -> diffusion prior (spec §0-§1)."""

    def __init__(self, config: MindEye2Config) -> None:
        super().__init__()
        self.config = config
        self.ridge = RidgeRegression(config.n_voxels, config.backbone.hidden_dim)
        self.backbone = BrainNetwork(config.backbone)
        self.diffusion_prior = DiffusionPrior(config.prior)

    @property
    def subjects(self) -> tuple[str, ...]:
        return self.config.subjects

    def embed(self, voxels: Tensor | np.ndarray, subject: str) -> BrainOutputs:
        """Backbone tokens, retrieval embedding and low-level latent for a batch of one subject's betas.

        ``voxels`` is (B, n_voxels) or (n_voxels,) in the subject's mask order, z-scored as in training.
        Gradients flow (the trainer uses this); wrap in ``torch.no_grad()`` for inference.
        """
        index = self.config.subject_index(subject)
        hidden = self.ridge(self._as_batch(voxels, index), index)
        return self.backbone(hidden)

    def forward(
        self, voxels_per_subject: Sequence[Tensor], image_tokens: Tensor | None = None
    ) -> tuple[BrainOutputs, Tensor | None]:
        """Training pass over a multi-subject batch; returns the outputs and the prior's loss.

        ``voxels_per_subject[i]`` is subject ``i``'s (B_i, n_voxels_i) batch (B_i may be 0), in config order,
        as the public multi-subject loop: each through its ridge layer, concatenated subject-major, one backbone
        pass. With ``image_tokens`` (sum B_i, n_tokens, dim) the diffusion prior's MSE loss (unscaled) comes back
        too. One call, so DDP and DeepSpeed see every parameter used in the pass.
        """
        if len(voxels_per_subject) != len(self.config.subjects):
            raise ModelError(
                f"forward needs one voxel batch per subject ({len(self.config.subjects)}: "
                f"{list(self.config.subjects)}), got {len(voxels_per_subject)}"
            )
        hidden = [
            self.ridge(self._as_batch(voxels, index), index)
            for index, voxels in enumerate(voxels_per_subject)
            if voxels.shape[0] > 0
        ]
        outputs = self.backbone(torch.cat(hidden))
        if image_tokens is None:
            return outputs, None
        return outputs, self.diffusion_prior.loss(image_tokens, outputs.backbone)

    @torch.no_grad()
    def sample_prior(
        self,
        backbone_tokens: Tensor,
        *,
        n_steps: int = 20,
        seed: int = 0,
        guidance_scale: float = 1.0,
        net: StepNet | None = None,
    ) -> Tensor:
        """Image tokens from the diffusion prior, deterministic for a given ``seed`` on a given device.

        ``n_steps`` < the schedule's length runs the public DDIM (eta 1) grid: 20 -> 19 network calls.
        ``guidance_scale`` 1 (MindEye2's setting) means no classifier-free guidance. ``net`` runs the network's
        evaluations instead (a compiled engine, see :meth:`DiffusionPrior.sample`).
        """
        generator = torch.Generator(device=backbone_tokens.device).manual_seed(seed)
        return self.diffusion_prior.sample(
            backbone_tokens, n_steps=n_steps, generator=generator, guidance_scale=guidance_scale, net=net
        )

    def _as_batch(self, voxels: Tensor | np.ndarray, index: int) -> Tensor:
        weight = self.ridge.linears[index].weight
        tensor = torch.as_tensor(voxels).to(device=weight.device, dtype=weight.dtype)
        if tensor.ndim == 1:
            tensor = tensor[None]
        expected = self.config.n_voxels[index]
        if tensor.ndim != 2 or tensor.shape[-1] != expected:
            raise ModelError(
                f"voxels for subject {self.config.subjects[index]!r} must be (batch, {expected}), "
                f"got {tuple(tensor.shape)}"
            )
        return tensor


def count_parameters(module: nn.Module, prefixes: Sequence[str] = ("",)) -> dict[str, int]:
    """Parameter counts (shared parameters once) of the whole module and of each named prefix."""
    counts = {}
    for prefix in prefixes:
        counts[prefix or "total"] = sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))
    return counts
