"""Model precision: casting weights to fp16/bf16 without casting the tables that must stay float32.

The public code runs its fp32 weights under fp16 autocast, so the diffusion prior's noise-schedule
buffers and the rotary frequencies are always float32 there. Casting them to bf16 would move the DDIM
coefficients by up to ~30% and rotary angles by radians, so every cast here leaves them alone:
:func:`cast_state` for state dicts, :class:`Float32Tables` for ``module.to(dtype)`` / ``.half()``.
"""

import torch
from torch import Tensor, nn

from rtdecode.errors import ModelError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT32_KEYS = ("noise_scheduler.", "rotary_emb.freqs")  # state-dict key fragments that stay float32


def torch_dtype(name: str) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16"`` -> the torch dtype, or a ModelError naming the choices."""
    if name not in DTYPES:
        raise ModelError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def keeps_float32(key: str) -> bool:
    return any(fragment in key for fragment in FLOAT32_KEYS)


def cast_state(state: dict[str, Tensor], dtype: str | None) -> dict[str, Tensor]:
    """Floating tensors cast to ``dtype`` (None: unchanged), except the float32 tables."""
    if dtype is None:
        return state
    target = torch_dtype(dtype)
    return {k: v.to(target) if v.is_floating_point() and not keeps_float32(k) else v for k, v in state.items()}


class Float32Tables(nn.Module):
    """A module whose own float32 tensors stay float32 when the model is cast; device moves still apply."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        own = {**self._parameters, **self._buffers}
        kept = {n: t.detach().clone() for n, t in own.items() if t is not None and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            current = getattr(self, name)
            if current.dtype == torch.float32:
                continue
            restored = original.to(current.device)
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(restored, requires_grad=False)
            else:
                self._buffers[name] = restored
        return self
