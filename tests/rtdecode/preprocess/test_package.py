"""Package-level rules: a light import, and settings checked where they are made."""

import subprocess
import sys

import pytest

from rtdecode.errors import ConfigError
from rtdecode.preprocess.registration import RegistrationSettings


def test_importing_the_package_does_not_import_torch():
    code = "import sys, rtdecode.preprocess, rtdecode.sim.phantom; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_registration_settings_are_checked():
    with pytest.raises(ConfigError, match=r"one positive integer per level; got \(2, 1\), \(1000,\), \(5, 5\)"):
        RegistrationSettings(pool_factors=(2, 1), n_points=(1000,), max_iterations=(5, 5))
    with pytest.raises(ConfigError, match="tolerance_mm must be > 0"):
        RegistrationSettings(tolerance_mm=0.0)
