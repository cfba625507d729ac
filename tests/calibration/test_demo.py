"""``rtdecode demo --quick`` end to end: the real trainer, calibration, simulator, daemon and display; its summary is
checked against the simulation's truth, recomputed here from the demo's folder (what the display saved and what the
simulated participant saw) with an independent binomial test."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

from scipy.stats import binom

from tests.helpers import run_rtdecode


def _recount(workdir):
    """Top-1 and top-5 hits from display/trials.jsonl against session/truth/truth.json."""
    truth = json.loads((workdir / "session" / "truth" / "truth.json").read_text())
    seen = {(t["run"], t["trial_id"]): t["stimulus_id"] for t in truth["trials"]}
    ranked = {}
    for line in (workdir / "display" / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("matches"):
            ranked[(record["run"], record["trial_id"])] = [m["id"] for m in record["matches"]]
    top1 = sum(ids[0] == seen[key] for key, ids in ranked.items())
    top5 = sum(seen[key] in ids[:5] for key, ids in ranked.items())
    return len(seen), len(ranked), top1, top5


def _volumes_kept(workdir):
    """Volumes written minus those the simulated scanner dropped or wrote truncated (never valid volumes)."""
    run = json.loads((workdir / "session" / "truth" / "truth.json").read_text())["runs"][0]
    lost = [fault for fault in run["faults"] if fault.split("@")[0] in ("drop", "truncate", "corrupt")]
    return run["n_volumes"] - len(lost)


def test_the_quick_demo_decodes_every_trial_well_above_chance(tmp_path):
    env = {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    out = run_rtdecode("demo", "--quick", "--workdir", str(tmp_path / "run"), env=env, timeout_s=600).stdout

    n_logged, n_decoded, top1, top5 = _recount(tmp_path / "run")
    assert f"volumes processed: {_volumes_kept(tmp_path / 'run')} " in out
    assert n_decoded == n_logged >= 50, out
    assert f"trials decoded: {n_decoded} of {n_logged} logged" in out
    pool_size = int(re.search(r"among the (\d+) pictures in the pool", out).group(1))
    assert f"top-1 {top1}/{n_decoded} " in out and f"top-5 {top5}/{n_decoded} " in out
    assert binom.sf(top5 - 1, n_decoded, 5 / pool_size) < 1e-3, out  # P(>= top5 hits by chance)
    assert "images: none generated" in out and "file close → beta" in out
    gallery = (tmp_path / "run" / "gallery.html").read_text()
    assert gallery.count("<tr>") == n_decoded and gallery.count('class="hit"') == top5

    assert "built in" in out  # the first run builds; a second reuses it, here with the web page
    _check_view_run(tmp_path, env)


def _check_view_run(tmp_path, env):
    """``demo --view``: the page is served during the run and stays up after the summary until Ctrl-C."""
    args = [sys.executable, "-m", "rtdecode", "demo", "--quick", "--view", "--listen", "127.0.0.1:0"]
    with open(tmp_path / "view-stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [*args, "--workdir", str(tmp_path / "again")], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        lines = _Lines(process.stdout)
        try:
            url = _wait_for_line(lines, r"the operator display is at (\S+)").group(1)
            _wait_for_line(lines, r"the page stays up")
            with urllib.request.urlopen(url + "state", timeout=10) as response:
                state = json.load(response)
            n_logged, n_decoded, _, _ = _recount(tmp_path / "again")
            assert len(state["gallery"]) == n_decoded == n_logged
            assert state["health"]["state"] == "stopped"
            top_match = state["gallery"][0]["matches"][0]["id"]  # the pool's pictures are served beside the matches
            with urllib.request.urlopen(f"{url}pool/{top_match}", timeout=10) as response:
                assert state["pool_images"] and response.headers["Content-Type"] == "image/png"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            process.wait()
    assert "reused from the cache" in "".join(lines.seen)


class _Lines:
    """A process's stdout lines, read by a thread so that a wait for a line can time out."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)


def _wait_for_line(lines: _Lines, pattern: str, timeout_s: float = 300):
    while True:
        try:
            line = lines.queue.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s: {''.join(lines.seen)}") from None
        if line is None:
            raise AssertionError(f"the demo ended before a line matching {pattern!r}: {''.join(lines.seen)}")
        lines.seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
