"""A run already on disk when the daemon starts (a late start, or a restart after the run ended) is served from its
files; a trial whose response was still coming when the run ended gets no online beta, so it is decoded from its
final beta when the run ends (here, at the stop)."""

from tests.rtdecode.serve.site import Listener, logged_trials, make_site, play, stop, trial_keys

N_VOLUMES = 30
TR_S = 1.6


def test_a_trial_at_the_very_end_is_decoded_from_its_final_beta(tmp_path, components):
    site = make_site(tmp_path, components, n_volumes=N_VOLUMES, speed=50.0)
    play(site).join(timeout=60)
    events = site.live.prepare().events_path(1)
    late_onset_s = N_VOLUMES * TR_S - 4.0  # its response peaks after the last volume
    with open(events, "a") as handle:
        handle.write(f"{late_onset_s:.3f}\t3.000\tlate-trial\timg-00001\ttrain\n")
    listener = Listener(site)
    daemon = site.start()
    expected = logged_trials(site)
    listener.wait_for(lambda: set(trial_keys(listener.of("image"))) >= expected, 120, "the logged trials' images")
    assert stop(daemon) == 0, site.logs()[-3000:]
    listener.wait_for(lambda: listener.of("status", kind="stopped"), 30, "the stopped status")
    listener.close()

    assert not listener.of("beta", trial_id="late-trial", version="online")
    assert len(listener.of("beta", trial_id="late-trial", version="final")) == 1
    image = listener.of("image", trial_id="late-trial")
    assert len(image) == 1 and image[0].header["run"] == 1
    images = trial_keys(listener.of("image"))
    assert set(images) == expected | {(1, "late-trial")} and max(images.values()) == 1
    volumes = [m.header["volume"] for m in listener.of("volume")]
    assert sorted(volumes) == list(range(N_VOLUMES))
