"""Helpers shared by the tests (importable as ``tests.helpers``; pytest puts the repo root on sys.path)."""

import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel

NIBABEL_DICOM_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
PYTHON = sys.executable


def dcm2niix_binary() -> str:
    """The dcm2niix binary shipped by the dcm2niix wheel (a dev dependency: its absence is a failure)."""
    import dcm2niix

    return str(dcm2niix.bin_path)


def run_dcm2niix(dicom_dir: Path, out_dir: Path) -> list[Path]:
    """Convert a folder with dcm2niix (uncompressed NIfTI + BIDS JSON); return the NIfTI files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [dcm2niix_binary(), "-b", "y", "-z", "n", "-f", "%s_%r", "-o", str(out_dir), str(dicom_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out_dir.glob("*.nii"))


def drain(ingestor, until, timeout_s: float = 20.0) -> list:
    """Collect ingest outputs until ``until(items)`` is true (or fail after ``timeout_s``)."""
    items: list = []
    deadline = time.monotonic() + timeout_s
    while not until(items):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for ingest; got {[describe(i) for i in items]}")
        try:
            items.append(ingestor.output.get(timeout=min(remaining, 0.2)))
        except queue.Empty:
            pass
    return items


def stop_and_drain(ingestor) -> list:
    """Stop the ingestor; return everything it put out until END (shutdown reports included)."""
    from rtdecode.ingest.pipeline import END

    ingestor.stop()
    items = []
    while (item := ingestor.output.get(timeout=30)) is not END:
        items.append(item)
    assert ingestor.join(timeout_s=10)
    return items


def describe(item) -> str:
    from rtdecode.records import Volume

    if isinstance(item, Volume):
        return f"volume run {item.run_index} #{item.volume_index}{' late' if item.late else ''}"
    return item.describe()


def copy_to(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    target = dst_dir / (name or src.name)
    shutil.copyfile(src, target)
    return target


def run_rtdecode(*args: str, env: dict, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m rtdecode ARGS`` as a real process; with ``check``, a non-zero exit fails showing its output."""
    result = subprocess.run(
        [sys.executable, "-m", "rtdecode", *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def wait_until(predicate, what: str, timeout_s: float = 15.0):
    """Poll ``predicate`` until it returns a true value (returned); fail naming ``what`` after ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
    return value
