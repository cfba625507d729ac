"""docs/protocol.md is the display developers' contract: its minimal client must work against the real publisher,
and its tables must name what the code does."""

import ast
import io
import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtdecode.publish import protocol
from rtdecode.publish.publisher import DEFAULT_HISTORY, PUBLISH_SNDHWM, Publisher

DOC = Path(__file__).parents[3] / "docs" / "protocol.md"
TIMEOUT_S = 30.0


def section(title: str) -> str:
    """The text under the Markdown heading ``title`` up to the next heading of the same or a higher level (lines
    in fenced code blocks are not headings: Python comments start with '#' too)."""
    lines = DOC.read_text(encoding="utf-8").splitlines(keepends=True)
    in_fence, start, level = False, None, 0
    for index, line in enumerate(lines):
        if line.startswith("```"):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"(#+) (.*?)\s*$", line)
        if heading and start is not None and len(heading.group(1)) <= level:
            return "".join(lines[start:index])
        if heading and start is None and heading.group(2) == title:
            start, level = index + 1, len(heading.group(1))
    assert start is not None, f"no heading {title!r} in {DOC}"
    return "".join(lines[start:])


def minimal_client() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", section("Minimal client"), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "the Minimal client section must hold one python block"
    return blocks[0]


def jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_minimal_client_uses_only_pyzmq_and_json():
    imported = set()
    for node in ast.walk(ast.parse(minimal_client())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"json", "sys", "zmq"}, imported


def test_minimal_client_runs_against_the_publisher(tmp_path):
    """The client joins while motion messages stream in: it shows the history once, then only newer messages."""
    script = tmp_path / "client.py"
    script.write_text(minimal_client(), encoding="utf-8")
    image = jpeg(48, 32)
    n_live = 5
    with Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as publisher:
        publisher.publish("status", {"kind": "run_started", "state": "running", "run": 1})
        description, payload = protocol.image_payload(image, "jpeg")
        image_fields = {"run": 1, "trial_id": "t0001", "width": 48, "height": 32, "seed": 7, "repeat": False}
        publisher.publish("image", {**image_fields, "payload": description}, payload)
        command = [sys.executable, str(script), publisher.publish_endpoint, publisher.snapshot_endpoint, str(n_live)]
        client = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for volume in itertools.count():  # one motion message per "TR" until the client has seen n_live
                assert time.monotonic() < deadline, "the client did not finish"
                publisher.publish("motion", {"run": 1, "volume": volume, "fd_mm": 0.05})
                try:
                    client.wait(timeout=0.02)
                    break
                except subprocess.TimeoutExpired:
                    pass
            stdout, stderr = client.communicate(timeout=TIMEOUT_S)
        finally:
            client.kill()
            client.wait()
    assert client.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[:2] == [
        "snapshot status seq=1 kind=run_started state=running",
        f"snapshot image seq=1 trial=t0001 jpeg {len(image)} bytes 48x32",
    ]
    n_history = next(i for i, line in enumerate(lines) if line.startswith("caught up")) - 2
    assert lines[2 : 2 + n_history] == [f"snapshot motion seq={seq}" for seq in range(1, n_history + 1)]
    assert lines[2 + n_history] == f"caught up: {n_history + 2} messages"
    live = lines[3 + n_history :]
    assert len(live) == n_live
    seqs = [int(re.fullmatch(r"live motion seq=(\d+)", line).group(1)) for line in live]
    assert seqs == list(range(n_history + 1, n_history + 1 + n_live))  # none shown twice, none lost


def test_doc_tables_match_the_code():
    frames = section("Frames")
    assert all(f"`{topic}`" in frames for topic in protocol.TOPICS)
    common = section("Header fields common to all topics")
    assert all(f"| `{field}` |" in common for field in protocol.PUBLISHER_FIELDS)
    assert all(f"`{encoding}`" in common or f'"{encoding}"' in common for encoding in protocol.ENCODINGS)
    topics = section("Topics")
    assert all(f"### {topic}" in topics for topic in protocol.TOPICS)
    history = ", ".join(f"{topic} {n}" for topic, n in DEFAULT_HISTORY.items())
    assert history in " ".join(section("Late join and gaps").split())
    assert f"more than {PUBLISH_SNDHWM} messages" in section("Sockets and ports")
    assert f"`schema` is {protocol.SCHEMA_VERSION}" in section("Versioning")


@pytest.mark.parametrize("heading", ["Security", "Late join and gaps", "Versioning", "Minimal client"])
def test_doc_has_the_sections(heading):
    assert section(heading).strip()
