"""``rtdecode evaluate`` end to end on real picture files: ceiling on identical pairs, chance on shuffled ones, the
report renders, and bad folders are refused naming what is wrong."""

import json
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from rtdecode.errors import ConfigError
from rtdecode.evaluate.evaluation import Evaluation, evaluate_images, parse_metrics
from rtdecode.evaluate.images import load_pairs
from rtdecode.evaluate.report import write_report
from tests.helpers import run_rtdecode

N_PICTURES = 12


def write_pictures(folder, seed: int, n: int = N_PICTURES, order=None, suffix=".png"):
    """Smooth random colour pictures (blobs, as photos are smoother than noise), one file per id."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [rng.random((8, 8, 3)) for _ in range(n)]
    for index in range(n):
        source = pictures[index if order is None else order[index]]
        image = Image.fromarray((source * 255).astype(np.uint8), mode="RGB").resize((96, 96), Image.BICUBIC)
        image.save(folder / f"img-{index:03d}{suffix}")
    return folder


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_identical_pairs_score_the_ceiling_and_shuffled_ones_chance(tmp_path):
    images = write_pictures(tmp_path / "seen", seed=1, n=60)
    same = load_pairs(images, images)
    ceiling = {
        r.name: r.value for r in evaluate_images(same.recons, same.images, ("pixcorr", "ssim"), weights_dir=None)
    }
    assert ceiling["pixcorr"] == pytest.approx(1.0, abs=1e-6) and ceiling["ssim"] == pytest.approx(1.0, abs=1e-6)
    shuffled = load_pairs(write_pictures(tmp_path / "shuffled", seed=1, n=60, order=np.roll(np.arange(60), 7)), images)
    chance = {
        r.name: r.value for r in evaluate_images(shuffled.recons, shuffled.images, ("pixcorr",), weights_dir=None)
    }
    assert abs(chance["pixcorr"]) < 0.1  # unrelated pictures: mean correlation near 0 (sd of the mean ~0.05)


def test_the_command_writes_a_report_with_the_table_grid_and_plots(tmp_path):
    write_pictures(tmp_path / "seen", seed=2)
    write_pictures(tmp_path / "recons", seed=3, suffix=".jpg")  # stems pair across formats
    env = {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    out = run_rtdecode(
        "evaluate", "--recons", str(tmp_path / "recons"), "--images", str(tmp_path / "seen"),
        "--metrics", "low-level", "--out", str(tmp_path / "report"), env=env,
    ).stdout  # fmt: skip
    assert "12 pairs" in out and "PixCorr" in out and "SSIM" in out
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["n_images"] == N_PICTURES and set(report["metrics"]) == {"pixcorr", "ssim"}
    assert len(report["per_item"]["ssim"]) == N_PICTURES
    page = _Page()
    page.feed((tmp_path / "report" / "evaluation.html").read_text())
    assert page.tags["svg"] == 2 and page.tags["tr"] == 11  # header + Table 1's 10 metrics
    assert len(page.images) == 2 * N_PICTURES and all((tmp_path / "report" / src).is_file() for src in page.images)


def test_unpaired_or_empty_folders_are_refused_by_name(tmp_path):
    write_pictures(tmp_path / "seen", seed=1, n=3)
    write_pictures(tmp_path / "recons", seed=1, n=2)
    with pytest.raises(ConfigError, match=r"1 \(img-002\) only in --images"):
        load_pairs(tmp_path / "recons", tmp_path / "seen")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--recons .*empty: no pictures"):
        load_pairs(tmp_path / "empty", tmp_path / "seen")
    (tmp_path / "recons" / "img-002.png").write_bytes(b"not a picture")
    with pytest.raises(ConfigError, match="img-002.png: not a readable picture"):
        load_pairs(tmp_path / "recons", tmp_path / "seen")
    with pytest.raises(ConfigError, match="unknown \\['alexnet9'\\]"):
        parse_metrics("pixcorr,alexnet9")


def test_the_report_of_an_evaluation_without_pairs_still_renders(tmp_path):
    evaluation = Evaluation(("a", "b"), (), None, {"clip": "no weights"})
    json_path, html_path = write_report(tmp_path, evaluation)
    assert json.loads(json_path.read_text())["not_computed"] == {"clip": "no weights"}
    assert "not available" in html_path.read_text() and "no weights" in html_path.read_text()


def test_captions_are_scored_where_their_data_is_present(tmp_path):
    write_pictures(tmp_path / "seen", seed=2, n=3)
    ids = [f"img-{index:03d}" for index in range(3)]
    (tmp_path / "captions.json").write_text(json.dumps({ids[0]: "a dog on grass", ids[1]: "a red car", ids[2]: "sky"}))
    references = {ids[0]: ["a dog on the grass"], ids[1]: ["a red car parked", "a car"], ids[2]: ["a boat"]}
    (tmp_path / "references.json").write_text(json.dumps(references))
    (tmp_path / "nltk").mkdir()  # no WordNet: METEOR is not computed, and says why
    env = {
        **os.environ,
        "RTDECODE_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "NLTK_DATA": str(tmp_path / "nltk"),
    }
    out = run_rtdecode(
        "evaluate", "--recons", str(tmp_path / "seen"), "--images", str(tmp_path / "seen"), "--metrics", "pixcorr",
        "--captions", str(tmp_path / "captions.json"), "--references", str(tmp_path / "references.json"),
        "--out", str(tmp_path / "report"), env=env,
    ).stdout  # fmt: skip
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    rouge1 = report["captions"]["rouge1"]["per_caption"]
    assert rouge1 == pytest.approx([2 * 4 / (4 + 5), 2 * 3 / (3 + 4), 0.0])  # shared words of 4 and 5; best ref; none
    assert "meteor" in report["not_computed"] and "wordnet" in report["not_computed"]["meteor"].lower()
    assert "sentence" in report["not_computed"] and "meteor: not computed" in out


def test_high_level_metrics_load_their_networks_from_local_files(tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights / "alexnet.pth")
    torch.save(torchvision.models.efficientnet_b1(weights=None).state_dict(), weights / "efficientnet_b1.pth")
    seen = write_pictures(tmp_path / "seen", seed=4, n=24)
    metrics = ("alexnet2", "alexnet5", "effnet")
    same = load_pairs(seen, seen)
    ceiling = {r.name: r.value for r in evaluate_images(same.recons, same.images, metrics, weights_dir=weights)}
    assert ceiling["alexnet2"] == ceiling["alexnet5"] == 1.0 and ceiling["effnet"] == pytest.approx(0.0, abs=1e-6)
    other = load_pairs(write_pictures(tmp_path / "other", seed=5, n=24), seen)
    chance = {r.name: r.value for r in evaluate_images(other.recons, other.images, metrics, weights_dir=weights)}
    assert abs(chance["alexnet2"] - 0.5) < 0.2 and chance["effnet"] > 0.05  # unrelated pairs: near chance
    with pytest.raises(ConfigError, match=r"inception_v3\.pth.*inception"):
        evaluate_images(same.recons, same.images, ("pixcorr", "inception"), weights_dir=weights)


def test_a_constant_reconstruction_is_undefined_for_pixcorr_not_a_nan_mean(tmp_path):
    seen = write_pictures(tmp_path / "seen", seed=6, n=4)
    recons = write_pictures(tmp_path / "recons", seed=6, n=4)
    Image.new("RGB", (96, 96), (128, 128, 128)).save(recons / "img-002.png")  # a grey picture: no correlation
    pairs = load_pairs(recons, seen)
    (pixcorr,) = evaluate_images(pairs.recons, pairs.images, ("pixcorr",), weights_dir=None)
    assert pixcorr.n_undefined == 1 and pixcorr.value == pytest.approx(1.0)  # the 3 others are identical pairs
    json_path, html_path = write_report(tmp_path / "report", Evaluation(pairs.ids, (pixcorr,)), pairs)
    report = json.loads(json_path.read_text())  # strict JSON: null, never NaN
    assert report["per_item"]["pixcorr"][2] is None and report["undefined"] == {"pixcorr": 1}
    assert "PixCorr: 1" in html_path.read_text()


def test_one_pair_is_enough_for_low_level_but_not_for_two_way(tmp_path):
    seen = write_pictures(tmp_path / "seen", seed=7, n=1)
    pairs = load_pairs(seen, seen)
    assert len(evaluate_images(pairs.recons, pairs.images, ("pixcorr", "ssim"), weights_dir=None)) == 2
    with pytest.raises(ConfigError, match="two-way identification needs at least 2 pairs"):
        evaluate_images(pairs.recons, pairs.images, ("alexnet2",), weights_dir=tmp_path)


def test_clip_voxels_are_read_in_the_pictures_order_and_checked(tmp_path):
    from rtdecode.evaluate_cli import read_clip_voxels

    rows = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    np.savez(tmp_path / "brain.npz", ids=np.array(["b", "a", "c"]), clip_voxels=rows)
    np.testing.assert_array_equal(read_clip_voxels(tmp_path / "brain.npz", ("a", "b")), rows[[1, 0]])
    with pytest.raises(ConfigError, match=r"no row for 1 of the pictures \(d\)"):
        read_clip_voxels(tmp_path / "brain.npz", ("a", "d"))
    np.savez(tmp_path / "short.npz", ids=np.array(["a", "b"]), clip_voxels=rows)
    with pytest.raises(ConfigError, match="2 ids but 3 rows"):
        read_clip_voxels(tmp_path / "short.npz", ("a",))
    np.savez(tmp_path / "other.npz", brain=rows)
    with pytest.raises(ConfigError, match="'ids' and 'clip_voxels' is needed"):
        read_clip_voxels(tmp_path / "other.npz", ("a",))


def test_retrieval_settings_are_checked(tmp_path):
    env = {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    seen = write_pictures(tmp_path / "seen", seed=8, n=2)
    result = run_rtdecode(
        "evaluate", "--recons", str(seen), "--images", str(seen), "--n-way", "1", env=env, check=False
    )
    assert result.returncode == 2 and "--n-way" in result.stderr
