"""The low-level ("blurry") reconstruction: the predicted 4x28x28 latent through the SD 1.x VAE (spec §5.1 step 6).

``clamp(VAE.decode(latent / 0.18215) / 2 + 0.5, 0, 1)``: a 224x224 image with the layout and colours of the scene but
no detail. It is cheap (one small decode), so it is also half of the fast preview, and a quarter of the final blend.
The divisor is the SD 1.x latent scale the public code uses, whatever the VAE folder's config says.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rtdecode.checkpoint_io import check_state, expected_shapes, torch_load
from rtdecode.errors import ComponentMissingError, GenerateError

SD1_LATENT_SCALE = 0.18215


class LowLevelDecoder:
    """SD 1.x ``AutoencoderKL`` decoding MindEye2's low-level latents, float32."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().float()
        self.n_channels = int(vae.config.latent_channels)
        self._vae_decode: Callable[[Tensor], Tensor] = lambda latents: self.vae.decode(latents).sample

    def use_networks(self, *, vae_decode: Callable[[Tensor], Tensor] | None = None) -> None:
        """Run the VAE decoder (latent already divided by the scale -> image) through another callable, e.g. a
        compiled engine."""
        if vae_decode is not None:
            self._vae_decode = vae_decode

    @classmethod
    def from_folder(cls, folder: Path, *, device: str | torch.device = "cpu") -> "LowLevelDecoder":
        from diffusers import AutoencoderKL

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ComponentMissingError(
                f"low-level VAE: {folder / 'config.json'} not found; make [models] low_level_vae_dir with: "
                "rtdecode model import-low-level-vae sd_image_var_autoenc.pth --out DIR"
            )
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        return cls(vae.to(device))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, 8h, 8w) in [0, 1] from latents (B, 4, h, w) (MindEye2: 28 -> 224)."""
        if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != self.n_channels:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise GenerateError(f"low-level latents must have shape (batch, {self.n_channels}, h, w), got {shape}")
        if not torch.isfinite(latents).all():
            raise GenerateError("low-level latents contain NaN or inf")
        device = next(self.vae.parameters()).device
        decoded = self._vae_decode(latents.to(device, torch.float32) / SD1_LATENT_SCALE)
        return (decoded / 2.0 + 0.5).clamp(0.0, 1.0)


def import_low_level_vae(checkpoint: Path, out_dir: Path) -> Path:
    """Write MindEye2's ``sd_image_var_autoenc.pth`` (spec §2.2: a diffusers ``AutoencoderKL`` state dict, the SD 1.x
    VAE of sd-image-variations, 83.65 M parameters) as a diffusers folder; every key and shape is checked first."""
    from diffusers import AutoencoderKL

    from rtdecode.generate.random_components import low_level_vae_config

    state = torch_load(Path(checkpoint))
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    with torch.device("meta"):
        vae = AutoencoderKL(**low_level_vae_config())
    check_state(expected_shapes(vae), state, str(checkpoint), hint="expected the SD 1.x VAE (sd_image_var_autoenc.pth)")
    vae.load_state_dict(state, assign=True)
    vae.float().save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
