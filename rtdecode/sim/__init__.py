"""The simulated scanner and the synthetic world: write scanner exports with known content and faults.

Importing this package is light (no numpy, no pydicom); the writers live in its modules.
"""

LAYOUTS = ("mosaic", "enhanced", "classic", "nifti", "nifti-gz", "nifti-4d", "nifti-4d-gz")
