"""The page in a real headless Chromium (Debian's ``chromium``; ``chromium-driver`` for the live test): the DOM
holds the caption, matches, health numbers and problems; a screenshot shows the latest image and the motion plot
lines; a page left open is green while the daemon heartbeats, follows the stream (Server-Sent Events) and turns red
when the daemon goes silent; trials without pictures show their top retrieval match from the pool folder. Every
wait has a timeout (chromedriver's output is read with one too).

``--dump-dom`` and ``--screenshot`` run after the page's load event. The page draws its first state before that
(the state is inlined in the HTML, and the pictures it adds delay the load event), so no virtual-time budget is
needed; one cannot be used: Chromium's virtual time waits for open network requests, and the page's event stream
stays open.
"""

import base64
import collections
import io
import json
import re
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtdecode.publish.publisher import Publisher
from rtdecode.view.server import Bridge, ViewServer
from rtdecode.view.state import DisplayState
from tests.rtdecode.view.stream import (
    CAPTIONS,
    COLOURS,
    FD_THRESHOLD_MM,
    MATCHES,
    MISSING_POOL_ID,
    N_VOLUMES,
    POOL_COLOURS,
    QUARANTINED_FILE,
    TIMEOUT_S,
    HeartbeatPump,
    Stream,
    read_line,
    retrieval_only,
    session,
    wait_subscribed,
    wait_until,
    write_pool,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1000",
    "--enable-logging=stderr",  # the page's console, errors included
]
BROWSER_TIMEOUT_S = 60.0
LINE_COLOURS = {  # the motion plot's lines (static/app.js)
    "translation x": (0x1F, 0x77, 0xB4),
    "translation y": (0xFF, 0x7F, 0x0E),
    "translation z": (0x94, 0x67, 0xBD),
    "rotation x": (0x17, 0xBE, 0xCF),
    "rotation y": (0xE3, 0x77, 0xC2),
    "rotation z": (0x8C, 0x56, 0x4B),
    "framewise displacement": (0xBC, 0xBD, 0x22),
}
LATEST_SIDE_PX = 384  # the latest image's size on the page (static/style.css)
NEW_COLOUR = (30, 30, 240)


def require(binary: Path, package: str) -> str:
    if not binary.exists():
        pytest.fail(f"{binary} is missing: install Debian's {package} (apt-get install {package}; `make test` does)")
    return str(binary)


@pytest.fixture
def live(tmp_path):
    """A view that was up before the session began (so it saw the problems live), its page URL and the stream,
    with a daemon heartbeat going on."""
    with Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as publisher:
        state = DisplayState(fd_threshold_mm=FD_THRESHOLD_MM)
        with Bridge(state, publisher.publish_endpoint, publisher.snapshot_endpoint), ViewServer(state) as server:
            # caught up (from an empty snapshot) before the first probe: the probe that comes through came live
            wait_until(lambda: state.to_json()["health"]["link"]["state"] == "connected", "the catch-up")
            wait_subscribed(publisher, lambda wait_s: received(state, 1, wait_s))
            n_probes = state.to_json()["n_messages"]
            stream = session(Stream(publisher))
            wait_until(lambda: received(state, n_probes + len(stream.sent), 0), "the session")
            with HeartbeatPump(stream) as pump:
                yield server.url, stream, state, pump


def received(state: DisplayState, n_messages: int, wait_s: float) -> bool:
    """Whether ``state`` has taken ``n_messages`` messages (waiting up to ``wait_s`` for them)."""
    deadline_s = time.monotonic() + wait_s
    while state.to_json()["n_messages"] < n_messages:
        if time.monotonic() >= deadline_s:
            return False
        state.wait_changed(state.version, max(0.0, deadline_s - time.monotonic()))
    return True


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [require(CHROMIUM, "chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    result = subprocess.run(command, capture_output=True, timeout=BROWSER_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result


class Dom(HTMLParser):
    """Text and attributes of the elements that have an id, from serialised HTML."""

    VOID = {"img", "br", "meta", "link", "input", "hr", "source", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.attributes: dict[str, dict] = {}
        self._texts: dict[str, list[str]] = collections.defaultdict(list)
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def text(self, element_id: str) -> str:
        assert element_id in self.attributes, f"no element #{element_id}"
        return " ".join(" ".join(self._texts[element_id]).split())  # text nodes apart, whitespace collapsed

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.attributes[attributes["id"]] = attributes
        if tag not in self.VOID:
            self._open.append((tag, attributes.get("id")))

    def handle_startendtag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.attributes[attributes["id"]] = attributes

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, element_id in self._open:
            if element_id is not None:
                self._texts[element_id].append(data)


def n_pixels_near(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels of ``image`` within ``tolerance`` of ``colour`` in every channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1).sum())


def test_the_dom_holds_the_caption_matches_health_numbers_and_problems(live, tmp_path):
    url, stream, state, _ = live
    result = chromium(tmp_path, "--dump-dom", url)
    console = [line for line in result.stderr.decode(errors="replace").splitlines() if ":CONSOLE" in line]
    assert not console, console  # no script error, no warning
    dom = Dom(result.stdout.decode())

    assert dom.text("caption") == CAPTIONS["t0003"]
    for match in MATCHES["t0003"]:
        assert f"{match['id']} {match['score']:.3f}" in dom.text("matches")
    assert dom.attributes["latest-image"]["src"] == state.to_json()["latest"]["image_url"]
    assert dom.text("n-volumes") == str(N_VOLUMES) and dom.text("n-trials-decoded") == "3"
    assert dom.text("backlog") == "0 (1)" and dom.text("workers") == "1 (0)" and dom.text("n-trials-lost") == "1 / 0"
    # (the health level depends on heartbeats arriving in time: the live test waits for it to be green)
    problems = dom.text("problems")
    assert "missing: run 1 volume(s) 5" in problems and QUARANTINED_FILE in problems and "t0004 skipped" in problems
    assert "volumes missing: 1 · files quarantined: 1 · trials skipped: 1" == dom.text("problem-counts")
    gallery = dom.text("gallery")
    assert all(trial_id in gallery for trial_id in ("t0001", "t0002", "t0003", "t0004"))
    assert "file close → beta" in dom.text("latency")
    assert "FD above threshold at volume(s) 7" in dom.text("motion-run")


def test_the_screenshot_shows_the_latest_image_and_the_motion_plot(live, tmp_path):
    url, *_ = live
    chromium(tmp_path, f"--screenshot={tmp_path / 'page.png'}", url)
    with Image.open(tmp_path / "page.png") as screenshot:
        screenshot.load()
    assert screenshot.size == (1280, 1000)

    latest_colour, preview_colour = COLOURS["t0003"]
    assert n_pixels_near(screenshot, latest_colour) >= 0.9 * LATEST_SIDE_PX**2  # the large latest image, not a tile
    assert n_pixels_near(screenshot, preview_colour) >= 0.9 * 128**2
    for line, colour in LINE_COLOURS.items():
        assert n_pixels_near(screenshot, colour) >= 40, f"the {line} line is not drawn"


class WebDriver:
    """Just enough of the W3C WebDriver protocol (plain HTTP + JSON) to drive chromedriver."""

    def __init__(self, profile_dir: Path) -> None:
        binary = require(CHROMEDRIVER, "chromium-driver")
        self.process = subprocess.Popen([binary, "--port=0"], stdout=subprocess.PIPE, bufsize=0)
        deadline_s = time.monotonic() + BROWSER_TIMEOUT_S
        line = ""
        while "started successfully" not in line:
            line = read_line(self.process.stdout, max(0.0, deadline_s - time.monotonic()), "chromedriver's start")
        port = re.search(r"port (\d+)", line).group(1)
        self.base = f"http://127.0.0.1:{port}"
        options = {"binary": str(CHROMIUM), "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]}
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        self.session = self.call("POST", "/session", {"capabilities": capabilities})["sessionId"]

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=BROWSER_TIMEOUT_S) as response:
            return json.loads(response.read())["value"]

    def run(self, script: str):
        return self.call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []})

    def screenshot(self) -> Image.Image:
        png = base64.b64decode(self.call("GET", f"/session/{self.session}/screenshot"))
        return Image.open(io.BytesIO(png))

    def close(self) -> None:
        try:
            self.call("DELETE", f"/session/{self.session}")
        finally:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT_S)


def test_an_open_page_is_green_follows_the_stream_and_turns_red_when_the_daemon_goes_silent(live, tmp_path):
    url, stream, _, pump = live
    require(CHROMIUM, "chromium")
    browser = WebDriver(tmp_path / "profile")
    try:
        browser.call("POST", f"/session/{browser.session}/url", {"url": url})
        caption = "return document.getElementById('caption').textContent"
        assert browser.run(caption) == CAPTIONS["t0003"]
        health = "return document.getElementById('health').className"
        badge = "return document.getElementById('health-badge').textContent"

        def green() -> bool:
            return "level-green" in browser.run(health) and browser.run(badge) == "running"

        # the daemon heartbeats all along (the pump): green once the page has drawn a state with a fresh heartbeat
        wait_until(green, "the health to be green", timeout_s=BROWSER_TIMEOUT_S)

        stream.decoded("t0005", colours=(NEW_COLOUR, NEW_COLOUR), caption="a blue boat", matches=MATCHES["t0001"])
        wait_until(lambda: browser.run(caption) == "a blue boat", "the page to draw the new trial")
        wait_until(lambda: browser.run("return document.getElementById('latest-image').complete"), "the image")
        assert n_pixels_near(browser.screenshot(), NEW_COLOUR) >= 0.9 * LATEST_SIDE_PX**2

        pump.stop()  # the daemon falls silent
        wait_until(lambda: "level-red" in browser.run(health), "the health to turn red")
        assert "no message for" in browser.run("return document.getElementById('health-reasons').textContent")
    finally:
        browser.close()


GALLERY_SCRIPT = """
return [...document.querySelectorAll('#gallery .tile')].map((tile) => {
  const img = tile.querySelector('img'), pending = tile.querySelector('.pending'), tag = tile.querySelector('.tag');
  return {
    label: tile.querySelector('.label').textContent,
    src: img.hidden ? null : img.getAttribute('src'),
    loaded: img.complete && img.naturalWidth > 0,
    pending: pending.hidden ? null : pending.textContent,
    tag: tag.hidden ? null : tag.textContent,
  };
});
"""
MATCHES_SCRIPT = """
return [...document.querySelectorAll('#matches li')].map((item) => {
  const img = item.querySelector('img');
  return {
    id: item.querySelector('.match-id').textContent,
    src: img ? img.getAttribute('src') : null,
    shown: Boolean(img) && !img.hidden && img.complete && img.naturalWidth > 0,
  };
});
"""


def test_trials_without_pictures_show_their_top_match_from_the_pool_folder(tmp_path):
    """``[serve] reconstruct = false`` and no preview: no tile says "decoding…" once its trial has a part, the
    tiles show the top match's pool picture marked "retrieval only", the latest panel shows one beside each match
    (none for a match without a picture) and does not say "no decoded trial yet"."""
    write_pool(tmp_path / "pool")
    with Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as publisher:
        retrieval_only(Stream(publisher))
        state = DisplayState()
        with (
            Bridge(state, publisher.publish_endpoint, publisher.snapshot_endpoint),
            ViewServer(state, pool_images_dir=tmp_path / "pool") as server,
        ):
            wait_until(lambda: len(state.to_json()["gallery"]) == 4, "the snapshot")
            require(CHROMIUM, "chromium")
            browser = WebDriver(tmp_path / "profile")
            try:
                browser.call("POST", f"/session/{browser.session}/url", {"url": server.url})

                def tiles():
                    found = browser.run(GALLERY_SCRIPT)
                    return found if all(tile["loaded"] for tile in found if tile["src"]) else None

                drawn = {tile["label"]: tile for tile in wait_until(tiles, "the gallery's pictures")}
                for trial_id in ("t0001", "t0002", "t0003"):
                    top = MATCHES[trial_id][0]["id"]
                    assert drawn[trial_id] == {
                        "label": trial_id,
                        "src": f"/pool/{top}",
                        "loaded": True,
                        "pending": None,
                        "tag": "retrieval only",
                    }
                assert drawn["t0004"]["src"] is None and drawn["t0004"]["pending"] == "decoding…"

                def matches():
                    found = browser.run(MATCHES_SCRIPT)
                    settled = all(match["shown"] or match["id"] == MISSING_POOL_ID for match in found)
                    return found if found and settled else None

                listed = wait_until(matches, "the matches' pictures")
                assert [match["id"] for match in listed] == [match["id"] for match in MATCHES["t0003"]]
                assert [match["shown"] for match in listed] == [True, True, False]  # nsd-7112 has no picture
                hidden = "return document.getElementById('latest-empty').hidden"
                assert browser.run(hidden) is True
                note = browser.run("return document.getElementById('latest-note').textContent")
                assert note.startswith("retrieval only: the picture is the top match nsd-61883")
                latest = "const i = document.getElementById('latest-image'); return [i.hidden, i.naturalWidth];"
                assert browser.run(latest)[0] is False and browser.run(latest)[1] > 0
                screenshot = browser.screenshot()
                assert n_pixels_near(screenshot, POOL_COLOURS["nsd-61883"]) >= 0.9 * LATEST_SIDE_PX**2
                pending = "return document.querySelectorAll('#gallery .tile .pending:not([hidden])').length"
                assert browser.run(pending) == 1  # t0004's "decoding…" only
            finally:
                browser.close()
