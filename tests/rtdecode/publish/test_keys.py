import shutil
import stat

import pytest
import zmq
import zmq.auth

from rtdecode.errors import ConfigError, SecurityError
from rtdecode.publish import keys


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_create_keypair_files_and_modes(tmp_path):
    keys_dir = tmp_path / "new" / "keys"
    public, secret = keys.create_keypair(keys_dir, "daemon")
    assert (public, secret) == (keys_dir / "daemon.key", keys_dir / "daemon.key_secret")
    assert mode(secret) == 0o600 and mode(keys_dir) == 0o700
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and same_public == public_key and len(secret_key) == 40
    assert sorted(p.name for p in keys_dir.iterdir()) == ["daemon.key", "daemon.key_secret"]  # no temporary left


def test_create_keypair_refuses_to_overwrite_unless_forced(tmp_path):
    public, secret = keys.create_keypair(tmp_path, "daemon")
    before = public.read_bytes()
    with pytest.raises(SecurityError, match="key pair 'daemon' already exists .*daemon.key.*refusing to overwrite"):
        keys.create_keypair(tmp_path, "daemon")
    assert public.read_bytes() == before
    keys.create_keypair(tmp_path, "daemon", force=True)
    assert public.read_bytes() != before and mode(secret) == 0o600


def test_create_keypair_refuses_when_only_half_exists(tmp_path):
    (tmp_path / "daemon.key_secret").write_text("stale")
    with pytest.raises(SecurityError, match="already exists"):
        keys.create_keypair(tmp_path, "daemon")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "two words"])
def test_create_keypair_bad_name(tmp_path, name):
    with pytest.raises(ConfigError, match="key name must match"):
        keys.create_keypair(tmp_path, name)


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("*", False),
        ("192.168.1.10", False),
        ("::", False),
        ("scanner-console", False),
        ("eth0", False),
    ],
)
def test_is_loopback_and_needs_curve(host, loopback):
    assert keys.is_loopback(host) is loopback
    assert keys.needs_curve(host) is not loopback


@pytest.mark.parametrize(
    "endpoint, needed",
    [
        ("tcp://127.0.0.1:5555", False),
        ("tcp://127.0.0.1:*", False),
        ("tcp://[::1]:5555", False),
        ("tcp://localhost:5555", False),
        ("ipc:///tmp/rtdecode.sock", False),
        ("inproc://decoder", False),
        ("tcp://*:5555", True),
        ("tcp://10.0.0.5:5557", True),
        ("tcp://gpu-node:5557", True),
        ("tcp://127.0.0.1:0;10.0.0.5:5557", True),  # connect from a local source to a remote peer
    ],
)
def test_endpoint_needs_curve(endpoint, needed):
    assert keys.endpoint_needs_curve(endpoint) is needed


def test_endpoint_without_transport():
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        keys.endpoint_needs_curve("127.0.0.1:5555")


def test_check_endpoint_security():
    keys.check_endpoint_security("decoder", "tcp://127.0.0.1:5557", has_curve=False)
    keys.check_endpoint_security("decoder", "tcp://*:5557", has_curve=True)
    keys.check_endpoint_security("decoder", "tcp://*:5557", has_curve=False, allow_insecure=True)
    with pytest.raises(SecurityError, match="decoder tcp://\\*:5557 is not loopback, so it needs CURVE keys"):
        keys.check_endpoint_security("decoder", "tcp://*:5557", has_curve=False)


def test_missing_and_unreadable_key_files(tmp_path, pairs):
    missing = tmp_path / "nowhere.key_secret"
    with pytest.raises(SecurityError, match=f"CURVE key file {missing} does not exist"):
        keys.CurveServer(missing, pairs["authorised"])
    with pytest.raises(SecurityError, match="server.key holds only a public key"):
        keys.CurveServer(pairs["server_public"], pairs["authorised"])
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("this is not a certificate\n")
    with pytest.raises(SecurityError, match=f"CURVE key file {garbage} cannot be read"):
        keys.CurveClient(garbage, pairs["server_public"])
    with pytest.raises(SecurityError, match=f"CURVE key file {tmp_path / 'server.pub'} does not exist"):
        keys.CurveClient(pairs["client_secret"], tmp_path / "server.pub")


def test_authorised_folder_errors(tmp_path, pairs):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SecurityError, match=f"authorised keys folder {missing} does not exist"):
        keys.CurveServer(pairs["server_secret"], missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(pairs["client_secret"], empty)  # a secret file is not an authorised public key
    with pytest.raises(SecurityError, match=f"authorised keys folder {empty} holds no public key"):
        keys.CurveServer(pairs["server_secret"], empty)
    (pairs["authorised"] / "broken.key").write_text("public-key = 'short'\n")
    with pytest.raises(SecurityError, match="broken.key holds a key that is not 40 Z85 characters"):
        keys.CurveServer(pairs["server_secret"], pairs["authorised"])


def test_server_loads_the_authorised_keys(pairs):
    server = keys.CurveServer(pairs["server_secret"], pairs["authorised"])
    client_public, _ = zmq.auth.load_certificate(pairs["client_secret"])
    assert server.authorised_keys == {client_public}
    assert server.public_key == zmq.auth.load_certificate(pairs["server_public"])[0]


def request_reply(context, server, client, timeout_s=1.0):
    """A REP (CURVE server) and a REQ (``client`` applied, or plain): the reply, or None when none came."""
    rep = context.socket(zmq.REP)
    server.apply(rep)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req = context.socket(zmq.REQ)
    if client is not None:
        client.apply(req)
    req.connect(f"tcp://127.0.0.1:{port}")
    req.send(b"ping")
    reply = None
    if rep.poll(timeout_s * 1000):
        rep.send(rep.recv() + b" pong")
        reply = req.recv() if req.poll(timeout_s * 1000) else None
    req.close()
    rep.close()
    return reply


def test_any_socket_kind_can_be_curve_protected(context, pairs):
    """The decoder link uses other socket kinds than the publisher: REQ/REP here."""
    server = keys.CurveServer(pairs["server_secret"], pairs["authorised"])
    with server:
        client = keys.CurveClient(pairs["client_secret"], pairs["server_public"])
        stranger = keys.CurveClient(pairs["stranger_secret"], pairs["server_public"])
        assert request_reply(context, server, client, timeout_s=10.0) == b"ping pong"
        assert request_reply(context, server, stranger) is None
        assert request_reply(context, server, None) is None


def test_reload_accepts_a_newly_authorised_key(context, pairs, tmp_path):
    server = keys.CurveServer(pairs["server_secret"], pairs["authorised"])
    stranger = keys.CurveClient(pairs["stranger_secret"], pairs["server_public"])
    with server:
        assert request_reply(context, server, stranger) is None
        shutil.copy(tmp_path / "keys" / "stranger.key", pairs["authorised"])
        server.reload()
        assert request_reply(context, server, stranger, timeout_s=10.0) == b"ping pong"


def test_one_zap_handler_per_context(context, pairs):
    first = keys.CurveServer(pairs["server_secret"], pairs["authorised"])
    second = keys.CurveServer(pairs["server_secret"], pairs["authorised"])
    socket = context.socket(zmq.PUB)
    with first, second:
        first.apply(socket)
        first.apply(context.socket(zmq.ROUTER))  # the same server again on the same context: fine
        with pytest.raises(SecurityError, match="another ZAP handler already runs on this ZeroMQ context"):
            second.apply(context.socket(zmq.ROUTER))


def test_closed_server_refuses_to_apply(context, pairs):
    server = keys.CurveServer(pairs["server_secret"], pairs["authorised"])
    server.close()
    server.close()
    with pytest.raises(SecurityError, match="is closed"):
        server.apply(context.socket(zmq.PUB))
