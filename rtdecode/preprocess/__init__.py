"""The preprocessing stage: Volume -> rigid motion correction -> masked vector (PreprocessedVolume).

Entry point: :class:`rtdecode.preprocess.motion.MotionCorrector`. Its parts, one module per concept:
:mod:`~rtdecode.preprocess.rigid` (the 6-parameter convention and framewise displacement),
:mod:`~rtdecode.preprocess.resample` (trilinear sampling with torch), :mod:`~rtdecode.preprocess.registration`
(6-DOF Gauss-Newton registration) and :mod:`~rtdecode.preprocess.mask` (the subject's voxel mask).

Importing this package is light (no torch); the modules import torch themselves.
"""
