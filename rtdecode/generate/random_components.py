"""Image-model folders with random weights, at tiny or real size: for tests, benchmarks and the demo.

Nothing is downloaded (our machines cannot), so every component can be made locally in the same layout the real
weights use, and loaded by the same code. A real-size folder with random weights is the right thing to time: the
cost of a network does not depend on its weights. Tiny folders share the real structure (SDXL blocks, two text
encoders, GIT) at widths that run in milliseconds on a CPU.

The tokenizers are tiny at both sizes: a byte-level CLIP BPE vocabulary without merges (514 entries: every
character is a token). The real vocabularies ship with the real weights; tokenisation costs nothing measurable.
"""

import json
from pathlib import Path
from typing import Literal

import torch

Size = Literal["tiny", "real"]

# SDXL base 1.0's UNet (diffusers layout); the refiner's context is CLIP-L 768 + bigG 1280 wide.
_SDXL_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
_TINY_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4),
    cross_attention_dim=16 + 24,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
    sample_size=16,
)
_CLIP_L_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
_BIGG_TEXT = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                  projection_dim=1280, hidden_act="gelu")  # fmt: skip
_TINY_TEXT_1 = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, projection_dim=16)
_TINY_TEXT_2 = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, projection_dim=24)


def _vae_config(size: Size, scaling_factor: float, n_real_levels: int = 4) -> dict:
    """An SD-family VAE: real (128, 256, 512, 512) or tiny (32, 64), both 4 latent channels."""
    channels = (128, 256, 512, 512)[:n_real_levels] if size == "real" else (32, 64)
    return dict(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=2 if size == "real" else 1,
        latent_channels=4,
        scaling_factor=scaling_factor,
        sample_size=768 if size == "real" else 32,
    )


def byte_level_vocab() -> dict[str, int]:
    """Every byte as a CLIP BPE token (GPT-2's printable byte mapping), with and without the word-end mark."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _clip_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], pad_token=pad_token, model_max_length=77)


def _text_encoders(size: Size):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shapes = (_CLIP_L_TEXT, _BIGG_TEXT) if size == "real" else (_TINY_TEXT_1, _TINY_TEXT_2)
    common = dict(vocab_size=len(byte_level_vocab()), max_position_embeddings=77, bos_token_id=512, eos_token_id=513)
    first = CLIPTextModel(CLIPTextConfig(**common, **shapes[0]))
    second = CLIPTextModelWithProjection(CLIPTextConfig(**common, **shapes[1]))
    return first, second


def build_refiner_pipeline(size: Size = "tiny", *, device: str | torch.device = "cpu"):
    """An SDXL base ``StableDiffusionXLPipeline`` with random weights, built on ``device``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.device(device):
        text_encoder, text_encoder_2 = _text_encoders(size)
        vae = AutoencoderKL(**_vae_config(size, 0.13025))
        unet = UNet2DConditionModel(**(_SDXL_UNET if size == "real" else _TINY_UNET))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer("<|endoftext|>"),
        tokenizer_2=_clip_tokenizer("!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )


def low_level_vae_config(size: Size = "real") -> dict:
    """``AutoencoderKL`` arguments of the SD 1.x VAE (real: MindEye2's, 8x upsampling) or a tiny one (2x)."""
    return _vae_config(size, 0.18215)


def build_low_level_vae(size: Size = "tiny", *, device: str | torch.device = "cpu"):
    """An SD 1.x ``AutoencoderKL`` with random weights (real: 8x upsampling, 28 -> 224; tiny: 2x)."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**low_level_vae_config(size))


def write_random_refiner(out_dir: Path, size: Size = "tiny", *, seed: int = 0) -> Path:
    """An SDXL base pipeline folder (diffusers ``save_pretrained``) with random weights."""
    torch.manual_seed(seed)
    build_refiner_pipeline(size).save_pretrained(out_dir, safe_serialization=True)
    _note_random(Path(out_dir), "refiner", size, seed)
    return Path(out_dir)


def write_random_low_level_vae(out_dir: Path, size: Size = "tiny", *, seed: int = 0) -> Path:
    """An SD 1.x VAE folder with random weights."""
    torch.manual_seed(seed)
    build_low_level_vae(size).save_pretrained(out_dir, safe_serialization=True)
    _note_random(Path(out_dir), "low-level VAE", size, seed)
    return Path(out_dir)


def write_random_components(out_dir: Path, size: Size = "tiny", *, seed: int = 0) -> dict[str, Path]:
    """All four image components under ``out_dir``; returns the ``[models]`` entries that name them."""
    from rtdecode.generate.caption import write_random_captioner
    from rtdecode.generate.geometry import UnclipGeometry
    from rtdecode.generate.unclip_folder import write_random_unclip

    out_dir = Path(out_dir)
    geometry = UnclipGeometry.published() if size == "real" else UnclipGeometry.tiny()
    return {
        "unclip_dir": write_random_unclip(out_dir / "unclip", geometry, seed=seed),
        "refiner_dir": write_random_refiner(out_dir / "refiner", size, seed=seed),
        "caption_dir": write_random_captioner(
            out_dir / "caption", size="large" if size == "real" else "tiny", seed=seed
        ),
        "low_level_vae_dir": write_random_low_level_vae(out_dir / "low_level_vae", size, seed=seed),
    }


def _note_random(folder: Path, component: str, size: Size, seed: int) -> None:
    note = {"component": component, "weights": "random", "size": size, "seed": seed}
    (folder / "rtdecode_random.json").write_text(json.dumps(note, indent=2) + "\n")
