"""Caption metrics: ROUGE against rouge-score and a hand count, METEOR's unavailable path, and the sentence
embedding on a tiny random BERT saved in the sentence-transformers layout."""

import json
from pathlib import Path

import pytest

from rtdecode.errors import ConfigError
from rtdecode.evaluate import captions
from rtdecode.evaluate.captions import (
    METEOR,
    METRIC_NAMES,
    ROUGE_1,
    ROUGE_L,
    SENTENCE,
    MetricValue,
    SentenceEncoder,
    Unavailable,
    caption_metrics,
    masked_mean,
    meteor,
    rouge,
    sentence_similarity,
)

VOCAB_WORDS = ["a", "dog", "cat", "on", "the", "grass", "sits", "runs", "red", "car", "near", "tree", "."]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_tiny_sentence_model(folder: Path, *, max_seq_length: int | None = None, pooling: dict | None = None) -> Path:
    """A random 2-layer BERT with a WordPiece vocabulary of a few words, saved with its tokenizer (plus the
    sentence-transformers config files when asked)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    vocab_path = folder / "vocab.txt"
    vocab_path.write_text("\n".join(SPECIAL_TOKENS + VOCAB_WORDS) + "\n")
    BertTokenizer(vocab=str(vocab_path)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(VOCAB_WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    if max_seq_length is not None:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture(scope="module")
def sentence_model_dir(tmp_path_factory) -> Path:
    return _write_tiny_sentence_model(tmp_path_factory.mktemp("minilm") / "model")


@pytest.fixture
def no_nltk_data(monkeypatch, tmp_path) -> Path:
    """nltk searches only an empty folder, whatever this machine has installed."""
    import nltk.data

    empty = tmp_path / "nltk_data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    return empty


# --- ROUGE -----------------------------------------------------------------------------------------------------


def test_rouge_of_identical_captions_is_one():
    scores = rouge(["A dog sits on the grass."], [["a dog sits on the grass"]])
    assert scores[ROUGE_1] == MetricValue(mean=1.0, per_caption=(1.0,))
    assert scores[ROUGE_L] == MetricValue(mean=1.0, per_caption=(1.0,))


def test_rouge_of_disjoint_captions_is_zero():
    scores = rouge(["a red car"], [["two dogs running"]])
    assert scores[ROUGE_1].mean == 0.0
    assert scores[ROUGE_L].mean == 0.0


def test_rouge_matches_a_hand_count():
    # prediction tokens: a dog runs on the grass (6); reference tokens: the dog sits on grass (5)
    # ROUGE-1: clipped unigram matches dog, on, the, grass = 4 -> P 4/6, R 4/5, F = 2PR/(P+R) = 8/11
    # ROUGE-L: longest common subsequence dog, on, grass = 3 ("the" comes before "dog" in the reference, after
    # it in the prediction) -> P 3/6, R 3/5, F = 6/11
    scores = rouge(["A dog runs on the grass."], [["The dog sits on grass"]])
    assert scores[ROUGE_1].per_caption[0] == pytest.approx(8 / 11, abs=1e-12)
    assert scores[ROUGE_L].per_caption[0] == pytest.approx(6 / 11, abs=1e-12)


def test_rouge_equals_rouge_scorer_and_keeps_the_best_reference():
    from rouge_score import rouge_scorer

    predictions = ["a man riding a wave on top of a surfboard", "two cats on a couch", "a plate of food"]
    references = [
        ["a surfer rides a large wave", "man on a surfboard riding a wave in the ocean"],
        ["a cat sleeping on a red couch"],
        ["a kitchen with a stove", "a plate with broccoli and rice", "food on a white plate"],
    ]
    scores = rouge(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    pairs = list(zip(predictions, references, strict=True))
    for name in (ROUGE_1, ROUGE_L):
        expected = [scorer.score_multi(refs, pred)[name].fmeasure for pred, refs in pairs]
        best_single = [max(scorer.score(ref, pred)[name].fmeasure for ref in refs) for pred, refs in pairs]
        assert scores[name].per_caption == pytest.approx(expected, abs=1e-12)
        assert scores[name].per_caption == pytest.approx(best_single, abs=1e-12)
        assert scores[name].mean == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_rouge_does_not_stem_like_hf_evaluate_default():
    from rouge_score import rouge_scorer

    stemmed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score("dog runs", "dogs running")
    assert stemmed["rouge1"].fmeasure == 1.0  # a stemmer would match these words
    assert rouge(["dogs running"], [["dog runs"]])[ROUGE_1].mean == 0.0


@pytest.mark.parametrize(
    ("predictions", "references", "needle"),
    [
        ([], [], "predictions"),
        (["a dog"], [["a dog"], ["a cat"]], "references"),
        (["a dog"], ["a dog"], "references[0]"),
        (["a dog"], [[]], "references[0]"),
        ([3], [["a dog"]], "predictions[0]"),
    ],
)
def test_bad_caption_inputs_are_refused(predictions, references, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        rouge(predictions, references)


# --- METEOR ----------------------------------------------------------------------------------------------------


def test_meteor_is_unavailable_without_wordnet_and_says_where_it_looked(no_nltk_data):
    result = meteor(["a dog sits on the grass"], [["a dog on grass"]])
    assert isinstance(result, Unavailable)
    assert str(no_nltk_data) in result.reason
    assert "wordnet" in result.reason and "punkt_tab" in result.reason
    assert "python -m nltk.downloader" in result.reason
    assert captions.missing_meteor_resources() == ["wordnet", "punkt_tab"]


@pytest.mark.skipif(bool(captions.missing_meteor_resources()), reason="needs nltk's wordnet and punkt_tab installed")
def test_meteor_reproduces_nltk_documented_example():
    prediction = "It is a guide to action which ensures that the military always obeys the commands of the party"
    references = [
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    ]
    result = meteor([prediction], [references])
    assert round(result.mean, 4) == 0.6944


# --- sentence similarity ---------------------------------------------------------------------------------------


def test_identical_sentences_have_cosine_one(sentence_model_dir):
    result = sentence_similarity(
        ["a dog sits on the grass", "a red car"],
        [["a dog sits on the grass"], ["a cat near the tree"]],
        model_dir=sentence_model_dir,
    )
    assert result.per_caption[0] == pytest.approx(1.0, abs=1e-6)
    assert result.per_caption[1] < 0.999
    assert result.mean == pytest.approx(sum(result.per_caption) / 2, abs=1e-12)


def test_sentence_similarity_keeps_the_best_reference(sentence_model_dir):
    result = sentence_similarity(["a red car"], [["a cat near the tree", "a red car"]], model_dir=sentence_model_dir)
    assert result.per_caption[0] == pytest.approx(1.0, abs=1e-6)


def test_mean_pooling_ignores_padding(sentence_model_dir):
    import torch

    encoder = SentenceEncoder.load(sentence_model_dir)
    short, long = "a dog", "a red car sits on the grass near the tree ."
    alone = encoder.embed([short])
    batched = encoder.embed([short, long])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-6, rtol=0)
    # the batch pads the short text: pooling over every position would have changed its embedding
    encoded = encoder.tokenizer([short, long], padding=True, return_tensors="pt")
    assert int(encoded["attention_mask"][0].sum()) < encoded["attention_mask"].shape[1]
    with torch.inference_mode():
        hidden = encoder.model(**encoded).last_hidden_state
    unmasked = torch.nn.functional.normalize(masked_mean(hidden, torch.ones_like(encoded["attention_mask"])), dim=-1)
    assert not torch.allclose(unmasked[0], alone[0], atol=1e-3)

    alone_score = sentence_similarity([short], [["a cat"]], model_dir=sentence_model_dir)
    batched_score = sentence_similarity([short, long], [["a cat"], ["a red car"]], model_dir=sentence_model_dir)
    assert batched_score.per_caption[0] == pytest.approx(alone_score.per_caption[0], abs=1e-6)


def test_texts_are_cut_at_the_folder_max_seq_length(tmp_path):
    import torch

    folder = _write_tiny_sentence_model(tmp_path / "model", max_seq_length=4)  # [CLS] two words [SEP]
    encoder = SentenceEncoder.load(folder)
    assert encoder.max_length_tokens == 4
    rows = encoder.embed(["a dog sits on the grass", "a dog", "a cat"])
    torch.testing.assert_close(rows[0], rows[1], atol=1e-6, rtol=0)
    assert not torch.allclose(rows[1], rows[2], atol=1e-3)


def test_a_folder_pooling_otherwise_than_mean_is_refused(tmp_path):
    folder = _write_tiny_sentence_model(
        tmp_path / "model", pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    )
    with pytest.raises(ConfigError, match="pooling_mode_cls_token"):
        SentenceEncoder.load(folder)


def test_missing_sentence_model_is_unavailable_naming_the_folder(tmp_path):
    missing = tmp_path / "all-MiniLM-L6-v2"
    result = sentence_similarity(["a dog"], [["a dog"]], model_dir=missing)
    assert isinstance(result, Unavailable)
    assert str(missing / "config.json") in result.reason and "hf download" in result.reason
    assert isinstance(sentence_similarity(["a dog"], [["a dog"]], model_dir=None), Unavailable)


# --- all together ----------------------------------------------------------------------------------------------


def test_caption_metrics_reports_missing_resources_beside_the_others(no_nltk_data, sentence_model_dir):
    results = caption_metrics(
        ["a dog sits on the grass", "a red car"],
        [["a dog sits on the grass"], ["a cat near the tree", "a red car near a tree"]],
        sentence_model_dir=sentence_model_dir,
    )
    assert tuple(results) == METRIC_NAMES
    assert isinstance(results[METEOR], Unavailable)
    assert results[ROUGE_1].per_caption[0] == 1.0
    assert results[ROUGE_L].per_caption == pytest.approx((1.0, 2 * 3 / (3 + 6)), abs=1e-12)  # LCS a red car
    assert results[SENTENCE].per_caption[0] == pytest.approx(1.0, abs=1e-6)

    without_model = caption_metrics(["a dog"], [["a dog"]], sentence_model_dir=None)
    assert isinstance(without_model[SENTENCE], Unavailable)
    assert without_model[ROUGE_1].mean == 1.0
