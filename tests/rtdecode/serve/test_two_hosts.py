"""Two hosts: the daemon sends trial betas to two ``rtdecode decode-worker`` processes over ZeroMQ; one is killed
with SIGKILL in the middle of a trial, and that trial is finished by the other. Nothing is lost or doubled."""

import signal

from tests.rtdecode.serve.site import Listener, logged_trials, make_site, play, stop, trial_keys

SLOW_IMAGES = {"unclip_steps": 60}  # about a second or two per trial on a CPU: a kill lands mid-trial


def test_a_worker_killed_mid_trial_loses_nothing(tmp_path, components):
    site = make_site(tmp_path, components, n_volumes=44, speed=4.0, remote_decoders=True, generate=SLOW_IMAGES,
                     serve={"worker_timeout_s": 2.0})  # fmt: skip
    listener = Listener(site)
    daemon = site.start(log_name="serve")
    worker = "decode-worker", "--subject", "syn08", "--connect", site.decoder_endpoint, "--name"
    workers = {name: site.start(*worker, name, log_name=name) for name in ("gpuA", "gpuB")}
    listener.wait_for(lambda: listener.of("status"), 120, "the daemon to start")
    listener.wait_for(lambda: listener.of("status", kind="heartbeat", workers=2), 120, "two workers to join")
    scanner = play(site)

    def started_on_a_only():
        done = {(m.header["run"], m.header["trial_id"]) for m in listener.of("image")}
        return [
            m
            for m in listener.of("retrieval")
            if m.header["worker"].startswith("gpuA") and (m.header["run"], m.header["trial_id"]) not in done
        ]

    listener.wait_for(started_on_a_only, 120, "worker gpuA to start a trial")
    victim = started_on_a_only()[0].header["trial_id"]
    workers["gpuA"].send_signal(signal.SIGKILL)
    scanner.join(timeout=180)
    expected = logged_trials(site)
    listener.wait_for(lambda: set(trial_keys(listener.of("image"))) >= expected, 240, "an image for every trial")
    assert stop(daemon) == 0, site.logs()[-3000:]
    stop(workers["gpuB"])
    listener.close()

    images = trial_keys(listener.of("image"))
    assert set(images) == expected and max(images.values()) == 1
    victim_image = listener.of("image", trial_id=victim)[0].header
    assert victim_image["worker"].startswith("gpuB") and victim_image["attempt"] == 2
    retrievals = trial_keys(listener.of("retrieval"))
    assert retrievals[(1, victim)] == 1  # gpuA's retrieval went out; gpuB's repeat of it was not published again
    assert {m.header["worker"].split()[0] for m in listener.of("retrieval")} == {"gpuA", "gpuB"}
    assert "gpuA" in site.logs() and "dead" in site.logs()
