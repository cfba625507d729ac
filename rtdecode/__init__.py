"""rtdecode: real-time fMRI decoding (MindEye2) next to the scanner.

Importing the package has one effect: on CPU-only torch builds it makes ``import torchvision``
work (see :mod:`rtdecode.torchvision_cpu`). Nothing heavy is imported here.
"""

from rtdecode import torchvision_cpu as _torchvision_cpu

__version__ = "0.1.0"

_torchvision_cpu.install()
