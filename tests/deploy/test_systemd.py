"""The service files: systemd's own verifier accepts them (with the install paths pointed at this checkout), and
their stop settings match the daemon's warm shutdown."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rtdecode.config import ServeConfig

UNITS_DIR = Path(__file__).parents[2] / "deploy" / "systemd"
UNITS = sorted(UNITS_DIR.glob("*.service"))
INSTALLED_BINARY = "/opt/rtdecode/.venv/bin/rtdecode"
STOP_MARGIN_S = 15  # beyond the decoders' shutdown_timeout_s: ending the run and flushing


def setting(unit: Path, key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", unit.read_text(), flags=re.MULTILINE)
    assert len(values) == 1, f"{unit.name}: {key} set {len(values)} times"
    return values[0]


def test_there_is_a_unit_for_each_host():
    assert [unit.name for unit in UNITS] == ["rtdecode-decode-worker@.service", "rtdecode-serve@.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_analyze_verify_accepts_the_unit(unit, tmp_path):
    binary = Path(sys.executable).with_name("rtdecode")
    text = unit.read_text().replace(INSTALLED_BINARY, str(binary))
    text = text.replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")  # the env file is installed later
    installed = tmp_path / unit.name
    installed.write_text(text)
    instance = tmp_path / unit.name.replace("@.service", "@new01.service")
    result = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr  # warnings count as failures


def test_a_verifier_warning_is_caught(tmp_path):
    """The check above is not blind: a misspelled key makes systemd-analyze warn."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "broken@.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nTimeoutStopSecs=90\n")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "broken@x.service")], capture_output=True, text=True
    )
    assert "Unknown key 'TimeoutStopSecs'" in result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_stopping_matches_the_daemons_warm_shutdown(unit):
    assert setting(unit, "KillSignal") == "SIGTERM"  # the first SIGTERM finishes cleanly; a second exits at once
    assert setting(unit, "KillMode") == "mixed"  # only the main process gets SIGTERM; SIGKILL reaches all at the end
    assert setting(unit, "RestartPreventExitStatus") == "2"  # configuration errors: a restart cannot fix them
    if "serve" in unit.name:
        shutdown_s = ServeConfig().shutdown_timeout_s
        assert int(setting(unit, "TimeoutStopSec")) >= shutdown_s + STOP_MARGIN_S
