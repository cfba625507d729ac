"""Fixtures for the preprocessing tests: the NSD-sized oblique grid and a phantom on it."""

import pytest

from rtdecode.sim.phantom import BrainPhantom
from rtdecode.sim.sources import SyntheticRun

NSD_SHAPE = (81, 104, 83)


@pytest.fixture(scope="session")
def nsd_affine():
    """SyntheticRun's grid: 1.8 mm isotropic, tilted 8 degrees about x (an oblique prescription)."""
    return SyntheticRun(shape=NSD_SHAPE).affine


@pytest.fixture(scope="session")
def phantom(nsd_affine):
    return BrainPhantom(NSD_SHAPE, nsd_affine, seed=3)
