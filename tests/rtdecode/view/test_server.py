"""The view server over real HTTP, fed by the Bridge from a real Publisher: routes, cache headers, the Host check,
Server-Sent Events; the Bridge: silence, CURVE, a newer protocol; the ``view`` command."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rtdecode.cli import _Globals
from rtdecode.errors import ConfigError, ProtocolError, SecurityError
from rtdecode.publish import keys, protocol
from rtdecode.publish.publisher import Publisher
from rtdecode.view.cli import DEFAULT_LISTEN, checked_listen, stop_on_signals, view
from rtdecode.view.server import IMMUTABLE, POOL_CACHE, STATIC_DIR, Bridge, ViewServer
from rtdecode.view.state import DisplayState
from tests.rtdecode.view.conftest import LOOPBACK
from tests.rtdecode.view.stream import (
    CAPTIONS,
    COLOURS,
    MATCHES,
    MISSING_POOL_ID,
    TIMEOUT_S,
    HeartbeatPump,
    RawPublisher,
    Stream,
    read_line,
    retrieval_only,
    session,
    wait_until,
    write_pool,
)

OPERATOR_GUIDE = Path(__file__).parents[3] / "docs" / "operator.md"


@pytest.fixture
def served(publisher):
    """A played session, a view joined late (bridge + HTTP server), and the stream to publish more."""
    stream = session(Stream(publisher))
    state = DisplayState(fd_threshold_mm=0.5)
    with Bridge(state, publisher.publish_endpoint, publisher.snapshot_endpoint), ViewServer(state) as server:
        wait_until(lambda: state.to_json()["latest"], "the snapshot")
        yield stream, state, server


def get(server, path, headers=None):
    """``(status, headers, body)`` of a GET; every response must say ``nosniff``."""
    request = urllib.request.Request(server.url.rstrip("/") + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, response_headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, response_headers, body = err.code, err.headers, err.read()
    assert response_headers.get_all("X-Content-Type-Options") == ["nosniff"], (path, status)
    return status, response_headers, body


def strict_json(text: str | bytes):
    """JSON as a browser's ``JSON.parse`` reads it: NaN and Infinity are errors."""

    def refuse(constant):
        raise AssertionError(f"{constant} in the state JSON: JSON.parse would throw")

    return json.loads(text, parse_constant=refuse)


def test_state_images_and_the_page_are_served(served):
    stream, state, server = served
    status, headers, body = get(server, "/state")
    view_json = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert view_json["latest"]["caption"] == CAPTIONS["t0003"] and view_json["latest"]["matches"] == MATCHES["t0003"]
    assert [trial["trial_id"] for trial in view_json["gallery"]] == ["t0004", "t0003", "t0002", "t0001"]

    published = {(m.header["trial_id"], m.topic): m for m in stream.sent if m.topic in ("image", "preview")}
    assert len(published) == 6
    for trial in view_json["gallery"][1:]:
        for kind, content_type in (("image", "image/jpeg"), ("preview", "image/png")):
            status, headers, body = get(server, trial[f"{kind}_url"])
            assert status == 200 and headers["Content-Type"] == content_type
            assert body == published[(trial["trial_id"], kind)].payload
            assert headers.get_all("Cache-Control") == [IMMUTABLE]  # the URL names these bytes for ever
    for stale in ("/image/1/t0003/image", "/image/1/t0003/image?v=1", f"/image/1/t0003/image?v=0-{state.version}"):
        status, headers, body = get(server, stale)  # not this picture's own URL: the current bytes, not cached
        assert status == 200 and body == published[("t0003", "image")].payload
        assert headers.get_all("Cache-Control") == ["no-store"], stale

    for path in ("/image/1/t0003/beta", "/image/1/nope/image", "/image/x/t0003/image", "/image/1/t0003", "/nope"):
        assert get(server, path)[0] == 404, path
    assert get(server, "/static/../state.py")[0] == 404
    status, headers, script = get(server, "/static/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"EventSource" in script
    assert headers.get_all("Cache-Control") == ["no-cache"]  # asked again each time: an update is picked up
    status, revalidated, body = get(server, "/static/app.js", {"If-None-Match": headers["ETag"]})
    assert (status, body, revalidated["ETag"]) == (304, b"", headers["ETag"])
    assert get(server, "/static/app.js", {"If-None-Match": '"another-version"'})[2] == script
    assert get(server, "/static/style.css")[1]["ETag"] != headers["ETag"]
    assert get(server, "/state")[1].get_all("Cache-Control") == ["no-store"]
    status, headers, page = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers.get_all("Cache-Control") == ["no-store"]  # it holds the state
    inlined = re.search(rb'<script id="initial-state" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(inlined)["latest"]["trial_id"] == "t0003"
    for element in (b"latest-image", b"caption", b"matches", b"gallery", b"motion-plot", b"latency", b"problems"):
        assert b'id="' + element + b'"' in page
    assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere


def test_events_push_the_state_when_a_new_message_arrives(served):
    stream, state, server = served
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT_S) as connection:
        request = f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAccept: text/event-stream\r\n\r\n"
        connection.sendall(request.encode("ascii"))
        reader = connection.makefile("rb")  # reads time out with the socket (TIMEOUT_S)
        assert next_line(reader).startswith(b"HTTP/1.1 200")
        headers = []
        while line := next_line(reader).rstrip(b"\r\n"):
            headers.append(line.decode("ascii").lower())
        assert "cache-control: no-store" in headers and "content-type: text/event-stream; charset=utf-8" in headers
        assert "x-content-type-options: nosniff" in headers
        first = next_event(reader)
        assert first["latest"]["trial_id"] == "t0003"

        stream.decoded("t0005", colours=COLOURS["t0001"], caption="a new trial", matches=MATCHES["t0001"])
        deadline_s = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline_s:  # one push per version (coalesced): read until the new trial is drawn
            pushed = next_event(reader)
            assert pushed["version"] > first["version"]
            if pushed["latest"]["caption"] == "a new trial":
                break
        else:
            raise AssertionError(f"no event drew the new trial within {TIMEOUT_S} s")
    assert pushed["latest"]["trial_id"] == "t0005" and pushed["gallery"][0]["trial_id"] == "t0005"


def next_line(reader) -> bytes:
    """The next line of an HTTP response whose socket has a timeout; fails clearly when none comes in time."""
    try:
        line = reader.readline()
    except TimeoutError:
        raise AssertionError(f"the server sent no line within {TIMEOUT_S} s") from None
    assert line, "the server closed the connection"
    return line


def next_event(reader) -> dict:
    """The data of the next SSE event (comments and retry lines skipped)."""
    data = []
    while True:
        line = next_line(reader).rstrip(b"\n")
        if line.startswith(b"data: "):
            data.append(line.removeprefix(b"data: "))
        elif not line and data:
            return json.loads(b"\n".join(data))


def test_a_request_naming_another_host_is_refused_unless_remote_is_allowed(served):
    """DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 reaches the display with
    ``Host: evil.example``; a loopback display answers only to its own names."""
    _, state, server = served
    port = server.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
        for path in ("/", "/state", "/events", "/static/app.js", "/image/1/t0003/image"):
            status, headers, body = get(server, path, {"Host": host})
            assert status == 403 and b"does not name this server" in body, (host, path)
            assert headers.get_all("Cache-Control") == ["no-store"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert get(server, "/state", {"Host": host})[0] == 200, host

    with ViewServer(state, allowed_hosts=("*",)) as remote:  # rtdecode view --allow-remote
        assert get(remote, "/state", {"Host": "display.example:8765"})[0] == 200
    with ViewServer(state, allowed_hosts=("display.example",)) as named:
        assert get(named, "/state", {"Host": f"display.example:{named.port}"})[0] == 200
        assert get(named, "/state", {"Host": f"127.0.0.1:{named.port}"})[0] == 403


def test_the_bridge_reports_a_silent_daemon_and_comes_back_with_it(publisher):
    endpoints = publisher.publish_endpoint, publisher.snapshot_endpoint
    stream = Stream(publisher)
    state = DisplayState()
    with Bridge(state, *endpoints):
        with HeartbeatPump(stream, period_s=0.1):
            wait_until(lambda: state.to_json()["health"]["heartbeat_s"] < 0.5, "the heartbeat period")
        publisher.close()  # the daemon dies: no message at all
        wait_until(lambda: state.to_json()["health"]["silent"], "silence")
        assert state.to_json()["health"]["level"] == "red"
        with Publisher(*endpoints) as restarted, HeartbeatPump(Stream(restarted), period_s=0.1):
            wait_until(lambda: state.to_json()["health"]["level"] == "green", "the restarted daemon")
            assert state.to_json()["n_restarts"] == 1


def test_a_newer_protocol_stops_the_bridge_and_says_to_upgrade(publisher):
    """A daemon on a newer schema: every message would fail, so the bridge ends (red, "upgrade") instead of listing
    one protocol problem per message; a single broken message is only a problem."""
    state = DisplayState()
    heartbeat = {"kind": "heartbeat", "state": "running", "workers": 1, "backlog": 0}
    with RawPublisher() as raw, Bridge(state, raw.endpoint, publisher.snapshot_endpoint) as bridge:

        def shown():
            raw.publish("status", heartbeat)
            return state.to_json()["n_messages"]

        wait_until(shown, "a first live message")
        raw.send([b"status", b"{not json", b""])
        wait_until(lambda: state.to_json()["problems"]["items"], "the broken message's problem")
        assert bridge.running and bridge.failure is None

        raw.publish("status", heartbeat, schema=2)
        wait_until(lambda: not bridge.running, "the bridge to stop")
    assert "schema version 2 is newer" in bridge.failure and bridge.failure.endswith("upgrade rtdecode view")
    health = state.to_json()["health"]
    assert health["level"] == "red" and health["reasons"][0] == {"code": "link", "text": bridge.failure}
    assert [item["kind"] for item in state.to_json()["problems"]["items"]] == ["protocol"]  # the broken one only


def test_curve_keys_let_an_authorised_display_in_and_keep_a_stranger_out(tmp_path):
    server_public, server_secret = keys.create_keypair(tmp_path / "keys", "server")
    client_public, client_secret = keys.create_keypair(tmp_path / "keys", "display")
    _, stranger_secret = keys.create_keypair(tmp_path / "keys", "stranger")
    (tmp_path / "authorised").mkdir()
    shutil.copy(client_public, tmp_path / "authorised")
    curve_server = keys.CurveServer(server_secret, tmp_path / "authorised")
    with curve_server, Publisher(LOOPBACK, LOOPBACK, curve=curve_server) as publisher:
        session(Stream(publisher))
        endpoints = publisher.publish_endpoint, publisher.snapshot_endpoint
        state = DisplayState()
        with Bridge(state, *endpoints, curve=keys.CurveClient(client_secret, server_public)):
            wait_until(lambda: state.to_json()["latest"], "the snapshot over CURVE")
        assert state.to_json()["latest"]["caption"] == CAPTIONS["t0003"]

        refused = DisplayState()
        with Bridge(refused, *endpoints, curve=keys.CurveClient(stranger_secret, server_public)) as bridge:
            wait_until(lambda: bridge.failure, "the refusal")
        assert "refused this client's CURVE key" in bridge.failure
        assert refused.to_json()["health"]["level"] == "red" and refused.to_json()["latest"] is None


def test_view_help_and_its_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDECODE_HOME", str(tmp_path))
    monkeypatch.delenv("RTDECODE_CONFIG", raising=False)
    runner = CliRunner()
    result = runner.invoke(view, ["--help"], obj=_Globals(None, ()))
    assert result.exit_code == 0 and "--connect" in result.output and "--save" in result.output

    result = runner.invoke(view, ["--connect", "tcp://10.0.0.2:5555"], obj=_Globals(None, ()))
    assert isinstance(result.exception, SecurityError) and "--client-key" in str(result.exception)
    result = runner.invoke(view, ["--listen", "0.0.0.0:8765"], obj=_Globals(None, ()))
    assert isinstance(result.exception, SecurityError) and "no login" in str(result.exception)
    result = runner.invoke(view, ["--connect", "ipc:///tmp/x"], obj=_Globals(None, ()))
    assert result.exit_code == 2 and "--snapshot is needed" in result.output


def test_the_view_command_serves_and_saves_until_interrupted(publisher, tmp_path):
    session(Stream(publisher))
    env = {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("RTDECODE_CONFIG", None)
    command = [sys.executable, "-m", "rtdecode", "view", "--connect", publisher.publish_endpoint]
    command += ["--snapshot", publisher.snapshot_endpoint, "--listen", "127.0.0.1:0", "--save", str(tmp_path / "rec")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)
    try:
        line = read_line(process.stdout, 20.0, "rtdecode view")
        url = re.search(r"view: (http://127\.0\.0\.1:\d+/)", line)
        if not url:
            process.kill()
            raise AssertionError(line + process.communicate(timeout=TIMEOUT_S)[1].decode(errors="replace"))

        def gallery():
            with urllib.request.urlopen(url.group(1) + "state", timeout=TIMEOUT_S) as response:
                return json.loads(response.read())["gallery"]

        assert len(wait_until(gallery, "the gallery", timeout_s=20.0)) == 4
        wait_until(lambda: (tmp_path / "rec" / "run-01" / "t0003.jpg").exists(), "the saved image")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
        process.wait(TIMEOUT_S)
    assert process.returncode == 0, err.decode(errors="replace")
    assert b"stopped after" in out and b"images saved in" in out


def test_the_operator_guide_names_the_parts_of_the_page_as_the_page_does():
    headings = re.findall(r"<h2>([^<]+?)\s*(?:<span|</h2>)", (STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    guide = OPERATOR_GUIDE.read_text(encoding="utf-8")
    section = guide.split("## During the runs", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(headings) == 6 and rows == ["health bar (top)", *rows[1:]]
    assert sorted(rows[1:]) == sorted(headings)


def test_pool_pictures_are_served_by_id_and_nothing_else(publisher, tmp_path):
    written = write_pool(tmp_path / "pool")
    (tmp_path / "secret.png").write_bytes(written["nsd-03050"])
    (tmp_path / "pool" / ".hidden.png").write_bytes(written["nsd-03050"])
    retrieval_only(Stream(publisher))
    state = DisplayState()
    with (
        Bridge(state, publisher.publish_endpoint, publisher.snapshot_endpoint),
        ViewServer(state, pool_images_dir=tmp_path / "pool") as server,
    ):
        wait_until(lambda: state.to_json()["latest"], "the snapshot")
        assert strict_json(get(server, "/state")[2])["pool_images"] is True
        for match_id, data in written.items():
            status, headers, body = get(server, f"/pool/{match_id}")
            content_type = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            assert (status, headers["Content-Type"], body) == (200, content_type, data), match_id
            assert headers.get_all("Cache-Control") == [POOL_CACHE]
        for path in (
            f"/pool/{MISSING_POOL_ID}",
            "/pool/..%2Fsecret",
            "/pool/%2E%2E%2Fsecret",
            "/pool/../secret",
            "/pool/.hidden",
            "/pool/nsd-03050.png",  # the id, not the file name
            "/pool/",
            "/pool/nsd-03050/x",
            "/pool/%00",
        ):
            assert get(server, path)[0] == 404, path
    with ViewServer(state) as without:  # no --pool-images: nothing served, the page is told so
        assert get(without, "/pool/nsd-03050")[0] == 404
        assert strict_json(get(without, "/state")[2])["pool_images"] is False
    with pytest.raises(ConfigError, match="not a folder"):
        ViewServer(state, pool_images_dir=tmp_path / "secret.png")


def test_a_header_with_nan_is_a_protocol_problem_and_the_state_stays_json(publisher):
    """Python's JSON parser reads NaN and Infinity; a browser's does not. A header holding one is refused when it
    is received (a problem names the field), so the page's state stays JSON the page can parse."""
    ids = {"subject": "new01", "session": 2, "run": 1, "trial_id": "t0001", "repeat": False, "worker": "gpu1"}
    state = DisplayState()
    with (
        RawPublisher() as raw,
        Bridge(state, raw.endpoint, publisher.snapshot_endpoint) as bridge,
        ViewServer(state) as server,
    ):

        def shown():
            raw.publish("status", {"kind": "heartbeat", "state": "running", "workers": 1, "backlog": 0})
            return state.to_json()["n_messages"]

        wait_until(shown, "a first live message")
        raw.publish("retrieval", {**ids, "matches": [{"id": "nsd-1", "score": float("nan")}]})
        raw.publish("status", {"kind": "heartbeat", "backlog": float("inf")})
        problems = wait_until(
            lambda: len(state.to_json()["problems"]["items"]) == 2 and state.to_json()["problems"], "two problems"
        )
        texts = [item["text"] for item in reversed(problems["items"])]
        assert [item["kind"] for item in problems["items"]] == ["protocol", "protocol"]
        assert "retrieval header: field 'matches[0].score' is NaN" in texts[0]
        assert "status header: field 'backlog' is Infinity" in texts[1]
        assert bridge.running and state.to_json()["latest"] is None
        view_json = strict_json(get(server, "/state")[2])
        assert view_json["problems"]["items"][0]["kind"] == "protocol"


def test_decode_refuses_non_finite_numbers_anywhere_in_a_header():
    fields = '"schema":1,"topic":"status","seq":1,"stream":"ab","published_s":1.0,"published_unix_s":2.0'
    for extra, field, text in (
        ('"x":NaN', "x", "NaN"),
        ('"x":{"y":[1,-Infinity]}', "x.y[1]", "-Infinity"),
        ('"x":1e999', "x", "1e999"),
    ):
        with pytest.raises(ProtocolError, match=re.escape(f"field '{field}' is {text}")):
            protocol.decode([b"status", f"{{{fields},{extra}}}".encode(), b""])
    header = protocol.decode([b"status", f'{{{fields},"x":"NaN","y":1e300}}'.encode(), b""]).header
    assert header["x"] == "NaN" and header["y"] == 1e300  # a string, and a large finite number, are fine


def test_a_non_finite_value_in_the_state_is_sent_as_null_with_a_problem(publisher):
    """A score sent as the string "NaN" passes the protocol and becomes a float NaN in the state: the page still
    gets JSON, the value empty, and a problem says where."""
    state = DisplayState()
    ids = {"subject": "new01", "session": 2, "run": 1, "trial_id": "t0001", "repeat": False}
    with (
        Bridge(state, publisher.publish_endpoint, publisher.snapshot_endpoint),
        ViewServer(state) as server,
    ):
        Stream(publisher).publish("retrieval", {**ids, "matches": [{"id": "nsd-1", "score": "NaN"}]})
        wait_until(lambda: state.to_json()["latest"], "the snapshot")
        for body in (
            get(server, "/state")[2],
            re.search(rb'id="initial-state" type="application/json">(.*?)</script>', get(server, "/")[2], re.S)[1],
        ):
            view_json = strict_json(body)
            assert view_json["latest"]["matches"] == [{"id": "nsd-1", "score": None}]
            problem = view_json["problems"]["items"][0]
            assert problem["kind"] == "view" and "latest.matches[0].score" in problem["text"]
            assert view_json["problems"]["counts"]["not_finite"] == 2  # latest and its gallery tile


def test_a_receiver_that_cannot_go_on_fails_instead_of_dying_silently(publisher):
    """A snapshot endpoint ZeroMQ refuses at connect time used to kill the receiver thread without a word."""
    state = DisplayState()
    with Bridge(state, publisher.publish_endpoint, "tcp://127.0.0.1:notaport") as bridge:
        wait_until(lambda: not bridge.running, "the receiver to end")
    assert "snapshot_endpoint 'tcp://127.0.0.1:notaport'" in bridge.failure
    assert state.to_json()["health"]["level"] == "red"


def view_command(publisher, tmp_path, *args: str, env_drop: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    for name in ("RTDECODE_CONFIG", *env_drop):
        env.pop(name, None)
    command = [sys.executable, "-m", "rtdecode", "view", "--connect", publisher.publish_endpoint, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)


def test_the_view_command_ends_when_its_receiver_cannot_go_on(publisher, tmp_path):
    process = view_command(publisher, tmp_path, "--snapshot", "tcp://127.0.0.1:notaport", "--listen", "127.0.0.1:0")
    try:
        out, err = process.communicate(timeout=20.0)
    finally:
        process.kill()
        process.wait(TIMEOUT_S)
    assert process.returncode == 2, (out, err)
    assert b"rtdecode: error: view: cannot connect to snapshot_endpoint" in err


def test_view_open_without_a_display_says_so_and_keeps_serving(publisher, tmp_path):
    """``--open`` on a host without a display: one line saying so, and the page is served until Ctrl-C."""
    session(Stream(publisher))
    args = ("--snapshot", publisher.snapshot_endpoint, "--listen", "127.0.0.1:0", "--open")
    process = view_command(publisher, tmp_path, *args, env_drop=("DISPLAY", "WAYLAND_DISPLAY"))
    try:
        url = re.search(r"view: (http://127\.0\.0\.1:\d+/)", read_line(process.stdout, 20.0, "rtdecode view"))
        said = ""
        while "no display" not in said:  # log lines come on stderr too
            said = read_line(process.stderr, 20.0, "rtdecode view's line about the display")
        assert said.startswith(f"view: no display here to open a browser on; open {url.group(1)} yourself"), said

        def latest():
            with urllib.request.urlopen(url.group(1) + "state", timeout=TIMEOUT_S) as response:
                return json.loads(response.read())["latest"]

        assert wait_until(latest, "the page's state", timeout_s=20.0)["trial_id"] == "t0003"
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
        process.wait(TIMEOUT_S)
    assert process.returncode == 0, err.decode(errors="replace")
    assert b"stopped after" in out


def test_stop_on_signals_sets_an_event_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(TIMEOUT_S)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt inside the block
        assert stop.wait(TIMEOUT_S)

    found = {}

    def elsewhere():  # signals reach the main thread only: a worker thread's Event is its own to set
        with stop_on_signals() as stop:
            found["handlers"] = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
            found["set"] = stop.is_set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(TIMEOUT_S)
    assert found == {"handlers": before, "set": False}


def test_checked_listen_keeps_the_page_on_loopback_unless_remote_is_allowed():
    assert checked_listen(DEFAULT_LISTEN, False) == ("127.0.0.1", 8765)
    assert checked_listen("[::1]:0", False) == ("::1", 0) and checked_listen("localhost:80", False)[0] == "localhost"
    with pytest.raises(SecurityError, match="--listen 0.0.0.0:8765: the page has no login"):
        checked_listen("0.0.0.0:8765", False)
    assert checked_listen("0.0.0.0:8765", True) == ("0.0.0.0", 8765)
    with pytest.raises(click.UsageError, match="--listen must be HOST:PORT"):
        checked_listen("8765", True)
