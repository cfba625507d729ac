"""The demo's scoring and gallery of saved trials, including a trial the display saved before any retrieval came
(the Saver writes ``"matches": null`` then)."""

from calibration.demo_report import score, write_gallery


def test_a_trial_saved_without_matches_is_unranked_and_still_gets_a_gallery_row(tmp_path):
    trials = {
        (1, "t1"): {"matches": [{"id": "a", "score": 0.9}, {"id": "b", "score": 0.5}]},
        (1, "t2"): {"matches": None, "caption": "a preview came, no retrieval yet"},
    }
    truth = {(1, "t1"): "a", (1, "t2"): "b"}
    result = score(trials, truth, pool_size=10)
    assert (result.n_scored, result.n_top1, result.n_topk) == (1, 1, 1)
    page = write_gallery(trials, truth, tmp_path / "stimuli", tmp_path / "gallery.html").read_text()
    assert "run 1 · t1" in page and "run 1 · t2" in page and "0.900" in page
