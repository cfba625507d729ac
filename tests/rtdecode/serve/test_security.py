"""Binding beyond loopback: refused without CURVE keys; with keys (rtdecode keys), an authorised display receives
and any other client receives nothing."""

import os
import subprocess

import pytest

from rtdecode.errors import SecurityError
from rtdecode.publish.keys import CurveClient, create_keypair
from rtdecode.publish.subscriber import Subscriber
from tests.rtdecode.serve.site import Listener, make_site, stop


def rtdecode(site, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(site.command(*args), capture_output=True, text=True, env=env, timeout=120, check=False)


def test_serving_beyond_loopback_needs_keys_and_only_authorised_clients_hear(tmp_path, components):
    site = make_site(tmp_path, components, host="0.0.0.0")
    refused = rtdecode(site, "serve", "--subject", "syn08")
    assert refused.returncode == 2
    assert "needs CURVE keys" in refused.stderr and "rtdecode keys init" in refused.stderr

    assert rtdecode(site, "keys", "add", "display1").returncode == 2  # no server keys yet
    assert rtdecode(site, "keys", "init").returncode == 0
    added = rtdecode(site, "keys", "add", "display1")
    assert added.returncode == 0 and "authorised" in added.stdout
    assert rtdecode(site, "keys", "list").stdout.split() == ["display1"]
    keys = site.home / "keys"
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0  # the secret is the owner's only

    daemon = site.start()
    authorised = Listener(site, curve=CurveClient(keys / "clients" / "display1.key_secret", keys / "server.key"))
    _, stranger_secret = create_keypair(tmp_path / "stranger", "stranger")
    stranger_curve = CurveClient(stranger_secret, keys / "server.key")
    stranger = Listener(site, curve=stranger_curve)
    plain = Listener(site)
    try:
        authorised.wait_for(lambda: len(authorised.of("status")) >= 5, 120, "heartbeats for the authorised display")
        assert stranger.messages == [] and plain.messages == []
        refused = Subscriber(site.publish_endpoint, site.snapshot_endpoint, curve=stranger_curve)
        try:
            with pytest.raises((SecurityError, TimeoutError)):
                refused.catch_up(5.0)
        finally:
            refused.close()
    finally:
        for listener in (authorised, stranger, plain):
            listener.close()
        assert stop(daemon) == 0, site.logs()[-3000:]
