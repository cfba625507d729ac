"""Make ``import torchvision`` work on CPU-only torch.

The only torchvision wheel that accepts torch 2.13 is a CUDA build. Its compiled extension cannot
load next to CPU torch, and the import then dies registering fake kernels for ``torchvision::nms``
("operator torchvision::nms does not exist"). That import failure also breaks open_clip, and the
parts of diffusers and transformers that probe torchvision.

:func:`install` puts a finder on ``sys.meta_path`` that, the first time torchvision is imported,
declares the two operator schemas torchvision's Python code registers fakes for. The Python parts
of torchvision (transforms, ops.misc) then work; its compiled operators (nms, roi_align,
decode_jpeg) do not, and rtdecode does not use them. On CUDA torch the finder does nothing.

The setup (``make setup``) also writes a ``.pth`` file (:func:`install_pth`) so the fix applies in
every interpreter of the virtual environment, not only after ``import rtdecode``.
"""

import importlib.abc
import sys
import sysconfig
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _TorchvisionCpuFinder(importlib.abc.MetaPathFinder):
    """Declares torchvision's operator schemas before torchvision itself is imported.

    It stays on ``sys.meta_path`` after doing so: it holds the ``torch.library.Library`` whose
    lifetime is the registrations' lifetime.
    """

    def __init__(self) -> None:
        self.library = None
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not self.done:
            self.done = True
            self._declare_schemas()
        return None  # the normal finders import torchvision

    def _declare_schemas(self) -> None:
        import torch

        if torch.version.cuda is not None:
            return
        self.library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            try:
                self.library.define(schema)
            except RuntimeError:  # already defined (torchvision's own extension loaded)
                pass


def install() -> None:
    """Put the finder on ``sys.meta_path`` unless torchvision is imported or a finder is there."""
    if "torchvision" in sys.modules:
        return
    if any(isinstance(finder, _TorchvisionCpuFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionCpuFinder())


def install_pth() -> Path:
    """Write a ``.pth`` file into this interpreter's site-packages that applies :func:`install`
    at every start of the virtual environment (so a bare ``import open_clip`` works too)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    target = purelib / "rtdecode-torchvision-cpu.pth"
    target.write_text("import rtdecode\n")
    return target
