"""The import rules of docs/architecture.md, checked by import-linter (contracts in pyproject.toml)."""

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is a dev dependency; run `make setup`"
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_code_passes_ruff():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is a dev dependency; run `make setup`"
    folders = ["rtdecode", "trainer", "calibration", "deploy", "tests"]
    for command in ([ruff, "check", *folders], [ruff, "format", "--check", *folders]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_one_distribution_holds_the_four_packages():
    distribution = importlib.metadata.distribution("rtdecode")
    assert [ep.value for ep in distribution.entry_points if ep.name == "rtdecode"] == ["rtdecode.cli:console_main"]
    for package in ("rtdecode", "trainer", "calibration", "deploy"):
        module = importlib.import_module(package)
        assert Path(module.__file__).parent == REPO / package
