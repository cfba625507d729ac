"""The engine interface, and its torch backend (eager, or ``torch.compile``).

Call an engine with its inputs in signature order (tensors of any floating dtype, on any device); it returns a
tuple of float32 tensors on its own device, one per output name. A backend implements :meth:`Engine._run` on
inputs already checked, cast to float32, contiguous and on its device.
"""

import abc
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rtdecode.engines.signature import Signature
from rtdecode.errors import EngineError

TORCH_MODES = ("eager", "compile")


class Engine(abc.ABC):
    """One stage behind one backend."""

    backend: str = ""

    def __init__(self, signature: Signature, *, precision: str, device: str | torch.device) -> None:
        self.signature = signature
        self.precision = precision
        self.device = torch.device(device)

    @property
    def stage(self) -> str:
        return self.signature.stage

    def describe(self) -> str:
        return f"{self.stage}: {self.backend} {self.precision} on {self.device}"

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        self.signature.check(inputs)
        prepared = [value.detach().to(self.device, torch.float32).contiguous() for value in inputs]
        outputs = self._run(prepared)
        if len(outputs) != len(self.signature.outputs):
            raise EngineError(
                f"engine {self.stage!r} ({self.backend}) gave {len(outputs)} outputs, "
                f"its signature names {len(self.signature.outputs)}: {list(self.signature.outputs)}"
            )
        return tuple(output.to(self.device, torch.float32) for output in outputs)

    @abc.abstractmethod
    def _run(self, inputs: list[Tensor]) -> Sequence[Tensor]:
        """The outputs for float32 inputs on this engine's device."""


class TorchEngine(Engine):
    """A torch module (float32) as an engine; ``mode`` ``compile`` wraps it in ``torch.compile`` (inductor)."""

    backend = "torch"

    def __init__(self, signature: Signature, module: nn.Module, *, mode: str = "eager",
                 device: str | torch.device | None = None) -> None:  # fmt: skip
        if mode not in TORCH_MODES:
            raise EngineError(f"torch engine mode must be one of {list(TORCH_MODES)}, got {mode!r}")
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else "cpu"
        super().__init__(signature, precision="fp32", device=device)
        self.mode = mode
        self.module = module.eval()
        self._forward = torch.compile(self.module) if mode == "compile" else self.module

    def describe(self) -> str:
        return f"{self.stage}: torch {self.mode} on {self.device}"

    @torch.no_grad()
    def _run(self, inputs: list[Tensor]) -> Sequence[Tensor]:
        outputs = self._forward(*inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)
