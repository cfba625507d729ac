"""MindEye2's captioner: GIT-large-coco fed with CLIP-L-like features instead of images (spec §2.4, §5.1 step 4).

What MindEye2 does
    The prior's bigG tokens (B, 256, 1664) pass through the bigG->L converter to (B, 257, 1024): the shape of what
    GIT-large's own CLIP ViT-L/14 gives for a 224 px image (256 patches + the class token, width 1024). MindEye2's
    patched GIT (``GitForCausalLMClipEmb``) takes these *as* ``pixel_values``: they go straight into
    ``git.visual_projection`` and the ViT never runs. Captions come from ``generate(pixel_values=features,
    max_length=20)`` with git-large-coco's generation defaults (greedy: one beam, no sampling), then
    ``batch_decode(..., skip_special_tokens=True)``.

How this module does it with stock transformers (5.24)
    ``GitModel.forward`` sends rank-4 ``pixel_values`` to ``self.image_encoder(pixel_values,
    interpolate_pos_encoding=...)`` and uses only ``.last_hidden_state`` of the result; projection, masks, KV cache
    and decoding follow unchanged. So:

    * ``git.image_encoder`` is replaced by :class:`FeatureInput`, a parameter-free module returning the features it
      is handed as ``BaseModelOutput(last_hidden_state=features)``.
    * Features (B, T, D) travel as ``pixel_values`` of shape (B, 1, T, D). Rank 4 selects GIT's single-image branch
      (rank 5 is its video branch), and ``generate`` handles them like any image input: batch size from dim 0, passed
      at the prefill step only, the image tokens then kept in the KV cache. :class:`FeatureInput` refuses any other
      shape, so a real image (B, 3, H, W) cannot be silently misread as features.
    * Loading goes through ``from_pretrained`` of a ``GitForCausalLM`` subclass (:func:`feature_fed_git_class`) that
      swaps the image encoder in ``__init__`` (from_pretrained builds on the meta device, so the ViT is never
      materialised) and lists ``git.image_encoder.*`` in ``_keys_to_ignore_on_load_unexpected``: the ~303M ViT-L
      weights of git-large-coco are never read or held. Every other weight must be in the file: transformers would
      silently initialise a missing one at random, so a missing, extra or mis-shaped key is a CheckpointError.
    * T must equal GIT's image token count ``(image_size / patch_size)**2 + 1`` (257 for git-large-coco) and D the
      vision width ``config.vision_config.hidden_size`` (1024): GIT widens the attention mask over the cached image
      tokens by that count in every later generation step.

    Everything after the image encoder is stock transformers code; the tests check that the bypass is exact (token
    ids and first-step logits equal ``generate(pixel_values=image)`` on an unmodified model fed the same image).

What ``max_length`` counts
    The returned token sequence *including* GIT's leading [CLS] (the bos token generation starts from), excluding the
    image tokens. MindEye2's ``max_length=20`` thus allows at most 19 generated word pieces, the last possibly [SEP]
    (eos); after ``skip_special_tokens`` a caption has at most 19 word pieces (18 when it ended with [SEP]).
"""

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from rtdecode.errors import CheckpointError, ComponentMissingError, GenerateError

if TYPE_CHECKING:  # transformers is imported on first use: it takes seconds
    from transformers import GenerationConfig, GitConfig, PreTrainedTokenizerBase
    from transformers.modeling_outputs import BaseModelOutput

GIT_LARGE_COCO = "microsoft/git-large-coco"
MINDEYE2_MAX_LENGTH = 20  # generate(max_length=20), spec §5.1 step 4; counts the leading [CLS]
IMAGE_ENCODER_KEYS = r"^git\.image_encoder\."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")

# git-large-coco (transformers' GIT conversion: only the vision tower is "large"; the text decoder keeps GitConfig's
# BERT-base-like defaults). About 394M parameters, of which about 303M are the ViT-L/14 that the captioner drops.
GIT_LARGE_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
GIT_LARGE_TEXT = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
    "bos_token_id": 101,
    "eos_token_id": 102,
}
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}  # bert-base-uncased

TINY_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_WORDS = (
    *("a", "an", "the", "of", "on", "in", "with", "and", "next", "to", "is", "are", "two", "some"),
    *("man", "woman", "person", "people", "child", "dog", "cat", "horse", "bird", "giraffe", "elephant"),
    *("car", "bus", "train", "plane", "boat", "table", "plate", "pizza", "food", "street", "field", "grass"),
    *("water", "room", "kitchen", "bed", "white", "black", "red", "large", "small", "sitting", "standing"),
    *("riding", "holding", "eating", ".", ","),
)
TINY_TEXT_WIDTH = 32
TINY_HEADS = {"text": 4, "vision": 2}
TINY_IMAGE_SIZE_PX = 16
TINY_PATCH_SIZE_PX = 4  # (16 / 4)^2 + 1 = 17 feature tokens
TINY_INIT_STD = 0.2  # larger than GIT's 0.02 so random captions depend on the features


class FeatureInput(nn.Module):
    """Stands in for GIT's image encoder: returns the vision features it is handed, packed as (B, 1, T, D)."""

    def __init__(self, n_tokens: int, feature_dim: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.feature_dim = feature_dim

    def forward(
        self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, **kwargs: object
    ) -> "BaseModelOutput":
        """``BaseModelOutput(last_hidden_state=features)`` for ``pixel_values`` = features (B, T, D) unsqueezed at 1."""
        from transformers.modeling_outputs import BaseModelOutput

        packed = (1, self.n_tokens, self.feature_dim)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != packed:
            raise GenerateError(
                f"the GIT captioner's pixel_values must be vision features packed as (batch, 1, {self.n_tokens}, "
                f"{self.feature_dim}) (Captioner.caption packs them), got {tuple(pixel_values.shape)}: images are "
                "not accepted"
            )
        return BaseModelOutput(last_hidden_state=pixel_values[:, 0])

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, feature_dim={self.feature_dim}"


def feature_token_count(config: "GitConfig") -> int:
    """Tokens per image GIT expects from its image encoder: ``(image_size / patch_size)**2 + 1`` (257 for ViT-L/14)."""
    vision = config.vision_config
    image_size_px, patch_size_px = vision.image_size, vision.patch_size
    if not (isinstance(image_size_px, int) and isinstance(patch_size_px, int)) or image_size_px % patch_size_px:
        raise CheckpointError(
            f"GIT vision_config: image_size {image_size_px!r} must be an int multiple of patch_size {patch_size_px!r}"
        )
    return (image_size_px // patch_size_px) ** 2 + 1


@functools.cache
def feature_fed_git_class() -> type:
    """``GitForCausalLM`` subclass whose image encoder is a :class:`FeatureInput` and whose ``from_pretrained``
    skips the checkpoint's image-encoder weights. Built on first use: importing transformers takes seconds."""
    from transformers import GitForCausalLM

    class GitForCausalLMFromFeatures(GitForCausalLM):
        """GIT captioning from vision features (B, T, D) passed as ``pixel_values`` (B, 1, T, D)."""

        _keys_to_ignore_on_load_unexpected = [IMAGE_ENCODER_KEYS]

        def __init__(self, config: "GitConfig"):
            super().__init__(config)
            self.git.image_encoder = FeatureInput(feature_token_count(config), config.vision_config.hidden_size)

    return GitForCausalLMFromFeatures


class Captioner:
    """GIT (git-large-coco) captions from CLIP-L-like vision features (B, 257, 1024), MindEye2's way (spec §5.1)."""

    def __init__(self, model: nn.Module, tokenizer: "PreTrainedTokenizerBase"):
        """Wrap a model built by :func:`feature_fed_git_class` (see :meth:`from_folder`) and its tokenizer."""
        if not isinstance(getattr(getattr(model, "git", None), "image_encoder", None), FeatureInput):
            raise GenerateError(
                f"Captioner needs a GIT model whose image encoder is a FeatureInput (load it with "
                f"Captioner.from_folder), got {type(model).__name__}"
            )
        if model.config.num_image_with_embedding is not None:
            raise CheckpointError(
                f"GIT config: num_image_with_embedding must be null (an image captioner such as {GIT_LARGE_COCO}), "
                f"got {model.config.num_image_with_embedding} (a video model)"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(
        cls, folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "Captioner":
        """Load a git-large-coco-layout folder (local files only), skipping the image encoder's weights."""
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(folder)
        _require_files(folder)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise GenerateError(f"captioner dtype must be a floating torch.dtype, got {dtype!r}")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type != "git":
            raise CheckpointError(
                f"captioner: {folder / 'config.json'} has model_type {config.model_type!r}, not 'git'"
            )
        model, loading_info = feature_fed_git_class().from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            ignore_mismatched_sizes=True,  # report mis-shaped keys (then refused below) instead of a bare RuntimeError
            output_loading_info=True,
        )
        _check_loading(folder, loading_info)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        _check_tokenizer(folder, tokenizer, model.generation_config)
        return cls(model.to(device), tokenizer)

    @property
    def n_feature_tokens(self) -> int:
        """Tokens per image the features must have (257 for git-large-coco)."""
        return self.model.git.image_encoder.n_tokens

    @property
    def feature_dim(self) -> int:
        """Width of each feature token, GIT's vision width (1024 for git-large-coco)."""
        return self.model.git.image_encoder.feature_dim

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_length_limit(self) -> int:
        """Largest ``max_length``: GIT's text position table (1024 for git-large-coco)."""
        return int(self.model.config.max_position_embeddings)

    def caption(self, features: Tensor, *, max_length: int = MINDEYE2_MAX_LENGTH) -> list[str]:
        """One caption per feature set (B, T, D): greedy GIT decoding, special tokens dropped, whitespace stripped.

        ``max_length`` counts GIT's leading [CLS] (module docstring): at most ``max_length - 1`` tokens are generated.
        """
        token_ids = self.caption_ids(features, max_length=max_length)
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids.cpu(), skip_special_tokens=True)]

    def caption_ids(self, features: Tensor, *, max_length: int = MINDEYE2_MAX_LENGTH) -> Tensor:
        """Token ids (B, <= max_length) from greedy generation, starting with [CLS]; finished rows padded with [PAD]."""
        packed = self._packed(features)
        self._check_max_length(max_length)
        with torch.inference_mode():
            return self.model.generate(
                pixel_values=packed, max_length=max_length, max_new_tokens=None, do_sample=False, num_beams=1
            )

    def first_token_logits(self, features: Tensor) -> Tensor:
        """Logits (B, vocab) GIT gives for the first caption token (after [CLS]): the first greedy step."""
        packed = self._packed(features)
        bos_ids = torch.full((len(packed), 1), self.model.generation_config.bos_token_id, device=self.device)
        with torch.inference_mode():
            return self.model(input_ids=bos_ids, pixel_values=packed).logits[:, -1]

    def _packed(self, features: Tensor) -> Tensor:
        """Checked features (B, T, D) on the model's device and dtype, packed as pixel_values (B, 1, T, D)."""
        if not isinstance(features, Tensor):
            raise GenerateError(f"features must be a torch.Tensor, got {type(features).__name__}")
        expected = (self.n_feature_tokens, self.feature_dim)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected or len(features) == 0:
            raise GenerateError(
                f"features must have shape (batch >= 1, {expected[0]}, {expected[1]}) (CLIP-L-like tokens from the "
                f"bigG->L converter, spec §2.4), got {tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise GenerateError(f"features must be floating point, got {features.dtype}")
        if not torch.isfinite(features).all():
            raise GenerateError(f"features {tuple(features.shape)} contain NaN or inf")
        return features.to(self.device, self.dtype).unsqueeze(1)

    def _check_max_length(self, max_length: int) -> None:
        limit = self.max_length_limit
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise GenerateError(
                f"max_length must be an int in [2, {limit}] (it counts GIT's leading [CLS] token), got {max_length!r}"
            )


def captioner_config(
    size: Literal["tiny", "large"] = "tiny", *, feature_dim: int | None = None, n_layers: int | None = None
) -> "GitConfig":
    """``GitConfig`` of a random captioner: "large" is git-large-coco's geometry (257 x 1024 features, for benchmarks
    at real size); "tiny" has ``feature_dim`` (default 16) wide features, 17 tokens and ``n_layers`` (default 1)
    layers in both towers, with the tiny vocabulary of :func:`captioner_vocabulary`."""
    from transformers import GitConfig

    if size == "large":
        if feature_dim is not None or n_layers is not None:
            raise GenerateError(
                f"feature_dim and n_layers shape the tiny captioner only; size 'large' is git-large-coco's fixed "
                f"geometry, got feature_dim={feature_dim!r}, n_layers={n_layers!r}"
            )
        return GitConfig(vision_config=dict(GIT_LARGE_VISION), **GIT_LARGE_TEXT)
    if size != "tiny":
        raise GenerateError(f"captioner size must be 'tiny' or 'large', got {size!r}")
    return _tiny_config(16 if feature_dim is None else feature_dim, 1 if n_layers is None else n_layers)


def _tiny_config(feature_dim: int, n_layers: int) -> "GitConfig":
    from transformers import GitConfig

    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 2 or feature_dim % 2:
        raise GenerateError(f"feature_dim must be an even int >= 2 (2 vision heads), got {feature_dim!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise GenerateError(f"n_layers must be an int >= 1, got {n_layers!r}")
    vision = {
        "hidden_size": feature_dim,
        "intermediate_size": 2 * feature_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": TINY_HEADS["vision"],
        "image_size": TINY_IMAGE_SIZE_PX,
        "patch_size": TINY_PATCH_SIZE_PX,
        "initializer_range": TINY_INIT_STD,
    }
    return GitConfig(
        vision_config=vision,
        vocab_size=len(captioner_vocabulary("tiny")),
        hidden_size=TINY_TEXT_WIDTH,
        num_hidden_layers=n_layers,
        num_attention_heads=TINY_HEADS["text"],
        intermediate_size=2 * TINY_TEXT_WIDTH,
        max_position_embeddings=64,
        initializer_range=TINY_INIT_STD,
        pad_token_id=TINY_SPECIAL_TOKENS.index("[PAD]"),
        bos_token_id=TINY_SPECIAL_TOKENS.index("[CLS]"),
        eos_token_id=TINY_SPECIAL_TOKENS.index("[SEP]"),
    )


def captioner_vocabulary(size: Literal["tiny", "large"] = "tiny") -> list[str]:
    """WordPiece vocabulary of a random captioner's tokenizer, in id order.

    "tiny": [PAD] [UNK] [CLS] [SEP] [MASK] and a few dozen caption words. "large": 30522 entries with the special
    tokens at bert-base-uncased's ids (as git-large-coco: [CLS] 101 = bos, [SEP] 102 = eos, [PAD] 0), the same words,
    and ``[unusedN]`` fillers.
    """
    if size == "tiny":
        return [*TINY_SPECIAL_TOKENS, *TINY_WORDS]
    vocabulary = [""] * GIT_LARGE_TEXT["vocab_size"]
    for token, token_id in BERT_SPECIAL_IDS.items():
        vocabulary[token_id] = token
    free_ids = [token_id for token_id, token in enumerate(vocabulary) if not token]
    for token_id, word in zip(free_ids[-len(TINY_WORDS) :], TINY_WORDS, strict=True):
        vocabulary[token_id] = word
    for n_unused, token_id in enumerate(token_id for token_id, token in enumerate(vocabulary) if not token):
        vocabulary[token_id] = f"[unused{n_unused}]"
    return vocabulary


def write_random_captioner(
    out_dir: Path,
    *,
    feature_dim: int | None = None,
    n_layers: int | None = None,
    seed: int = 0,
    size: Literal["tiny", "large"] = "tiny",
) -> Path:
    """Write a random GIT folder in git-large-coco's layout (config.json, generation_config.json, model.safetensors
    with the image encoder, tokenizer files) that :meth:`Captioner.from_folder` loads as it loads the real one.

    For tests, benchmarks and the demo. ``size="large"`` writes git-large-coco's geometry (about 1.6 GB).
    The global torch RNG is left as it was. Returns ``out_dir``.
    """
    from transformers import BertTokenizer, GitForCausalLM

    config = captioner_config(size, feature_dim=feature_dim, n_layers=n_layers)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GitForCausalLM(config)
    model.save_pretrained(out_dir)
    vocabulary = captioner_vocabulary(size)
    BertTokenizer(vocab={token: token_id for token_id, token in enumerate(vocabulary)}).save_pretrained(out_dir)
    return out_dir


def _save_command(folder: Path) -> str:
    """The command that writes a git-large-coco folder where the config points."""
    return (
        'python -c "from transformers import AutoModelForCausalLM, AutoProcessor; '
        f"AutoModelForCausalLM.from_pretrained('{GIT_LARGE_COCO}').save_pretrained('{folder}'); "
        f"AutoProcessor.from_pretrained('{GIT_LARGE_COCO}').save_pretrained('{folder}')\""
    )


def _missing(folder: Path, expected: str) -> ComponentMissingError:
    return ComponentMissingError(
        f"captioner: {expected} not found; [models] caption_dir must be a local copy of {GIT_LARGE_COCO} saved with "
        f"transformers' save_pretrained (model + processor/tokenizer). Make it with: {_save_command(folder)}"
    )


def _require_files(folder: Path) -> None:
    """ComponentMissingError naming the first file of the git-large-coco layout that the folder lacks."""
    if not folder.is_dir():
        raise _missing(folder, f"folder {folder}")
    if not (folder / "config.json").is_file():
        raise _missing(folder, str(folder / "config.json"))
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise _missing(folder, f"weights {folder / WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise _missing(folder, f"tokenizer {folder / TOKENIZER_FILES[0]} (or {TOKENIZER_FILES[1]})")


def _check_loading(folder: Path, loading_info: dict) -> None:
    """CheckpointError unless every non-image-encoder weight came from the file with its shape, and nothing else."""
    problems = {
        "missing": sorted(loading_info["missing_keys"]),
        "unexpected": sorted(loading_info["unexpected_keys"]),
        "mis-shaped": sorted(_mismatch(entry) for entry in loading_info["mismatched_keys"]),
        "errors": list(loading_info["error_msgs"]),
    }
    listed = "; ".join(f"{kind}: {', '.join(keys[:10])}" for kind, keys in problems.items() if keys)
    if listed:
        raise CheckpointError(f"captioner weights in {folder} do not match its config.json ({listed})")


def _check_tokenizer(folder: Path, tokenizer: "PreTrainedTokenizerBase", generation_config: "GenerationConfig") -> None:
    """CheckpointError unless the tokenizer's [CLS]/[SEP] are the model's bos/eos (git-large-coco: 101/102)."""
    eos_ids = generation_config.eos_token_id
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    wrong = []
    if tokenizer.cls_token_id != generation_config.bos_token_id:
        wrong.append(f"[CLS] {tokenizer.cls_token_id} != bos {generation_config.bos_token_id}")
    if tokenizer.sep_token_id not in eos_ids:
        wrong.append(f"[SEP] {tokenizer.sep_token_id} not in eos {eos_ids}")
    if wrong:
        raise CheckpointError(f"captioner: the tokenizer in {folder} does not fit its model ({', '.join(wrong)})")


def _mismatch(entry: object) -> str:
    """One mis-shaped key as transformers reports it, ``(key, shape in file, shape in model)``, in words."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, file_shape, model_shape = entry
        return f"{key} {tuple(file_shape)} in the file, {tuple(model_shape)} in the model"
    return str(entry)
