"""The paper's caption metrics (spec §6): METEOR, ROUGE-1, ROUGE-L and sentence-embedding cosine.

Each predicted caption is scored against its reference captions (COCO captions, or GIT captions of the true
images); every metric gives one value per caption and their mean. The settings follow what the paper used,
HF ``evaluate``'s ``meteor`` and ``rouge`` with their defaults and sentence-transformers all-MiniLM-L6-v2:

- ROUGE-1 / ROUGE-L: F-measure from Google's ``rouge-score`` (which HF ``evaluate`` wraps), its default tokenizer
  (lower case, runs of ``[a-z0-9]``) and *no* Porter stemming (HF's default ``use_stemmer=False``). With several
  references a prediction keeps the reference with the highest F-measure (``RougeScorer.score_multi``, what HF
  does with a list of references). HF's aggregate is the ``mid`` of a random bootstrap of the mean; here it is the
  plain mean, which that bootstrap estimates (HF with ``use_aggregator=False`` gives the per-caption values).
- METEOR: ``nltk.translate.meteor_score.meteor_score`` on ``nltk.word_tokenize`` tokens, alpha 0.9, beta 3,
  gamma 0.5 (HF's defaults), the best reference when there are several (nltk's rule). It needs the WordNet corpus
  and the ``punkt_tab`` sentence model on nltk's data path (``NLTK_DATA`` and nltk's default folders); nothing is
  downloaded, a missing one makes METEOR :class:`Unavailable` with the folders searched and the install command.
- Sentence: a local all-MiniLM-L6-v2 folder (sentence-transformers layout) run with ``transformers``: mean of the
  last hidden states over the attention mask (padding ignored), L2-normalised, cosine with the reference; the best
  reference when there are several. A missing folder makes the metric :class:`Unavailable`.

Metrics whose resources are missing are reported, not raised, so the others still come out.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rtdecode.errors import ConfigError

if TYPE_CHECKING:
    import torch

METEOR = "meteor"
ROUGE_1 = "rouge1"
ROUGE_L = "rougeL"
SENTENCE = "sentence"
METRIC_NAMES = (METEOR, ROUGE_1, ROUGE_L, SENTENCE)

ROUGE_USES_STEMMER = False  # HF evaluate's rouge default
METEOR_ALPHA = 0.9  # HF evaluate's meteor defaults (equal to nltk's)
METEOR_BETA = 3.0
METEOR_GAMMA = 0.5
# nltk resources METEOR needs, by download name: WordNet for synonym matches, punkt_tab for word_tokenize.
METEOR_NLTK_RESOURCES = {"wordnet": "corpora/wordnet", "punkt_tab": "tokenizers/punkt_tab/english/"}
SENTENCE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCE_BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class MetricValue:
    """A metric's mean over captions and its value for each caption (in the order given)."""

    mean: float
    per_caption: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed here: why, and how to make it available."""

    reason: str


MetricResult = MetricValue | Unavailable


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    sentence_model_dir: Path | None,
    device: str = "cpu",
) -> dict[str, MetricResult]:
    """All caption metrics of predictions[i] against references[i] (one or more captions each), keyed by
    :data:`METRIC_NAMES`; a metric whose library, corpus or model folder is missing is :class:`Unavailable`."""
    check_captions(predictions, references)
    results: dict[str, MetricResult] = {METEOR: meteor(predictions, references)}
    results.update(rouge(predictions, references))
    results[SENTENCE] = sentence_similarity(predictions, references, model_dir=sentence_model_dir, device=device)
    return results


def check_captions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ConfigError unless there is at least one prediction, each a string, and a non-empty sequence of
    reference strings for each (a bare string as references[i] is refused: it would be scored letter by letter)."""
    if len(predictions) == 0:
        raise ConfigError("predictions: at least one caption is needed to score, got none")
    if len(references) != len(predictions):
        raise ConfigError(
            f"references: one sequence of reference captions per prediction is needed, got {len(references)} "
            f"for {len(predictions)} predictions"
        )
    for index, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(prediction, str):
            raise ConfigError(f"predictions[{index}]: must be a string, got {type(prediction).__name__}")
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(ref, str) for ref in refs):
            raise ConfigError(
                f"references[{index}]: must be a non-empty sequence of caption strings (wrap a single caption "
                f"as [caption]), got {refs!r}"
            )


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, MetricResult]:
    """ROUGE-1 and ROUGE-L F-measures (keys :data:`ROUGE_1`, :data:`ROUGE_L`) as HF evaluate's rouge computes
    them: rouge-score's default tokenizer, no stemming, the best of several references per prediction."""
    check_captions(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        missing = Unavailable(
            f"ROUGE needs the rouge-score package ({error}): install it with pip install 'rtdecode[eval]'"
        )
        return {ROUGE_1: missing, ROUGE_L: missing}
    scorer = rouge_scorer.RougeScorer([ROUGE_1, ROUGE_L], use_stemmer=ROUGE_USES_STEMMER)
    per_caption: dict[str, list[float]] = {ROUGE_1: [], ROUGE_L: []}
    for prediction, refs in zip(predictions, references, strict=True):
        best = scorer.score_multi(list(refs), prediction)
        for name, values in per_caption.items():
            values.append(float(best[name].fmeasure))
    return {name: _metric_value(values) for name, values in per_caption.items()}


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    """METEOR as HF evaluate's meteor computes it (nltk, word_tokenize, alpha 0.9, beta 3, gamma 0.5, best
    reference), or Unavailable naming the nltk resources missing and the folders searched."""
    check_captions(predictions, references)
    try:
        from nltk.tokenize import word_tokenize
        from nltk.translate.meteor_score import meteor_score
    except ImportError as error:
        return Unavailable(f"METEOR needs the nltk package ({error}): install it with pip install 'rtdecode[eval]'")
    missing = missing_meteor_resources()
    if missing:
        return Unavailable(_missing_resources_reason(missing))
    values = [
        meteor_score(
            [word_tokenize(ref) for ref in refs],
            word_tokenize(prediction),
            alpha=METEOR_ALPHA,
            beta=METEOR_BETA,
            gamma=METEOR_GAMMA,
        )
        for prediction, refs in zip(predictions, references, strict=True)
    ]
    return _metric_value(values)


def missing_meteor_resources() -> list[str]:
    """The download names of the nltk resources METEOR needs that are not on nltk's data path (searched as nltk
    searches it, zipped or not; nothing is downloaded)."""
    import nltk.data

    missing = []
    for download_name, resource_path in METEOR_NLTK_RESOURCES.items():
        try:
            nltk.data.find(resource_path)
        except LookupError:
            missing.append(download_name)
    return missing


def _missing_resources_reason(missing: Sequence[str]) -> str:
    import nltk.data

    names = " ".join(missing)
    searched = ", ".join(str(folder) for folder in nltk.data.path)
    return (
        f"METEOR needs the nltk resource(s) {', '.join(missing)} (WordNet corpus for synonym matches, punkt_tab "
        f"for word_tokenize), not found in {searched}: install with `python -m nltk.downloader -d DIR {names}` on "
        f"a machine with network access and set NLTK_DATA=DIR (nothing is downloaded at run time)"
    )


def sentence_similarity(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    model_dir: Path | None,
    device: str = "cpu",
    batch_size: int = SENTENCE_BATCH_SIZE,
) -> MetricResult:
    """Cosine between the all-MiniLM-L6-v2 sentence embeddings of each prediction and its best reference, or
    Unavailable when ``model_dir`` is not given or holds no model (config.json)."""
    check_captions(predictions, references)
    missing = _missing_model_reason(model_dir)
    if missing is not None:
        return Unavailable(missing)
    encoder = SentenceEncoder.load(model_dir, device=device)
    prediction_rows = encoder.embed(predictions, batch_size=batch_size)
    reference_rows = encoder.embed([ref for refs in references for ref in refs], batch_size=batch_size)
    values, start = [], 0
    for index, refs in enumerate(references):
        cosines = reference_rows[start : start + len(refs)] @ prediction_rows[index]
        values.append(float(cosines.max()))
        start += len(refs)
    return _metric_value(values)


def _missing_model_reason(model_dir: Path | None) -> str | None:
    how = f"download it once with `hf download {SENTENCE_MODEL_NAME} --local-dir DIR` and pass DIR"
    if model_dir is None:
        return f"sentence similarity needs a local {SENTENCE_MODEL_NAME} folder and none was given: {how}"
    if not (Path(model_dir) / "config.json").is_file():
        return (
            f"sentence similarity needs {SENTENCE_MODEL_NAME} in {model_dir}; {model_dir}/config.json not found: {how}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    """A sentence-transformers-format BERT folder run with transformers: masked mean pooling, L2 normalised."""

    tokenizer: object
    model: object
    max_length_tokens: int
    device: str

    @classmethod
    def load(cls, model_dir: Path, *, device: str = "cpu") -> "SentenceEncoder":
        """Load tokenizer and model from ``model_dir`` only (no network). Texts are cut at the folder's
        ``sentence_bert_config.json`` ``max_seq_length`` (256 for all-MiniLM-L6-v2) as sentence-transformers
        does, else at the model's position limit. Raises ConfigError when the folder's pooling is not mean."""
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        _check_mean_pooling(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        max_length_tokens = _max_length_tokens(model_dir, tokenizer, model)
        return cls(tokenizer=tokenizer, model=model, max_length_tokens=max_length_tokens, device=device)

    def embed(self, texts: Sequence[str], *, batch_size: int = SENTENCE_BATCH_SIZE) -> "torch.Tensor":
        """Unit-length float32 embeddings, one row per text, on the CPU."""
        import torch

        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows.append(self._embed_batch(list(texts[start : start + batch_size])))
        return torch.cat(rows) if rows else torch.zeros(0, self.model.config.hidden_size)

    def _embed_batch(self, texts: list[str]) -> "torch.Tensor":
        import torch.nn.functional as F

        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**encoded).last_hidden_state.float()
        pooled = masked_mean(hidden, encoded["attention_mask"])
        return F.normalize(pooled, dim=-1).cpu()


def masked_mean(hidden: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
    """Mean of ``hidden`` (batch, tokens, features) over the tokens whose ``attention_mask`` is 1, so padding
    added to batch texts of different lengths does not change a text's embedding."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    n_tokens = weights.sum(dim=1).clamp(min=1.0)
    return (hidden * weights).sum(dim=1) / n_tokens


def _check_mean_pooling(model_dir: Path) -> None:
    config_path = model_dir / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return
    modes = {key for key, on in json.loads(config_path.read_text()).items() if key.startswith("pooling_mode_") and on}
    if modes != {"pooling_mode_mean_tokens"}:
        raise ConfigError(
            f"{config_path}: the sentence metric pools by the mean over tokens ({SENTENCE_MODEL_NAME}), this "
            f"folder's pooling is {sorted(modes)}"
        )


def _max_length_tokens(model_dir: Path, tokenizer, model) -> int:
    config_path = model_dir / "sentence_bert_config.json"
    if config_path.is_file():
        max_seq_length = json.loads(config_path.read_text()).get("max_seq_length")
        if max_seq_length is not None:
            return int(max_seq_length)
    return int(min(tokenizer.model_max_length, model.config.max_position_embeddings))


def _metric_value(values: Sequence[float]) -> MetricValue:
    per_caption = tuple(float(value) for value in values)
    return MetricValue(mean=sum(per_caption) / len(per_caption), per_caption=per_caption)
