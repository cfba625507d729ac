"""The backlog policy under a generator slower than the trials: latest_only keeps the volume loop on time, decodes
the newest trial each time the decoder frees up, and reports every trial it skipped; none goes unaccounted."""

from tests.rtdecode.serve.site import Listener, logged_trials, make_site, play, stop, trial_keys

VERY_SLOW_IMAGES = {"unclip_steps": 80}


def test_latest_only_skips_reported_trials_and_decodes_the_rest(tmp_path, components):
    site = make_site(tmp_path, components, n_volumes=48, speed=10.0, generate=VERY_SLOW_IMAGES,
                     serve={"backlog": "latest_only"})  # fmt: skip
    listener = Listener(site)
    daemon = site.start()
    listener.wait_for(lambda: listener.of("status"), 120, "the daemon to start")
    play(site).join(timeout=120)
    expected = logged_trials(site)
    listener.wait_for(lambda: listener.of("volume", volume=47), 60, "the last volume")
    last_volume_s = listener.of("volume", volume=47)[0].header["published_s"]

    def idle_after_the_last_volume():
        idle = listener.of("status", kind="heartbeat", backlog=0, in_flight=0)
        return [m for m in idle if m.header["published_s"] > last_volume_s]

    listener.wait_for(idle_after_the_last_volume, 120, "an idle decoder after the last volume")
    assert stop(daemon) == 0, site.logs()[-3000:]
    listener.close()

    betas = trial_keys(listener.of("beta", version="online"))
    assert set(betas) == expected and max(betas.values()) == 1  # every beta is published, decoded or not
    decoded = set(trial_keys(listener.of("image")))
    skipped = [(m.header["run"], m.header["trial_id"]) for m in listener.of("status", kind="trial_skipped")]
    assert len(skipped) == len(set(skipped)) and not decoded & set(skipped)
    assert decoded | set(skipped) == expected
    assert skipped and decoded  # the generator could not keep up, and yet trials were decoded
    assert all("latest_only" in m.header["message"] for m in listener.of("status", kind="trial_skipped"))
    assert max(m.header["backlog_peak"] for m in listener.of("status")) == 1
    assert listener.of("volume")[-1].header["volume"] == 47  # the volume loop kept up to the end
