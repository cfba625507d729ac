"""``rtdecode evaluate``: the paper's metrics of reconstructions against the seen images, retrieval from brain
embeddings, and a report. Wiring only: pictures and embeddings are read here, the image embedder comes from
``rtdecode.models``, everything else is :mod:`rtdecode.evaluate`."""

import json
from pathlib import Path

import click
import numpy as np

from rtdecode.errors import ConfigError
from rtdecode.evaluate.retrieval import PAPER_N_DRAWS, PAPER_N_WAY


@click.command("evaluate")
@click.option(
    "--recons",
    "recons_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Reconstructions, one picture per image, named as in --images.",
)
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The images that were seen (the same file stems).",
)
@click.option(
    "--clip-voxels",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Retrieval: .npz with 'ids' and 'clip_voxels' (one row per id: the model's brain embedding, "
    "repetitions averaged). The seen images are embedded with [models] image_embedder.",
)
@click.option(
    "--metrics",
    "metrics_text",
    default="all",
    show_default=True,
    help="'all', 'low-level' (PixCorr, SSIM: no weights needed) or names: pixcorr,ssim,alexnet2,alexnet5,"
    "inception,clip,effnet,swav.",
)
@click.option(
    "--weights",
    "weights_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Feature networks folder. Default: [models] metric_networks_dir.",
)
@click.option(
    "--captions",
    "captions_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Caption metrics: JSON {id: predicted caption}; needs --references.",
)
@click.option(
    "--references",
    "references_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="JSON {id: [reference captions]} (COCO's, say).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("evaluation"),
    show_default=True,
    help="Where evaluation.json, evaluation.html and the thumbnails go.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device of the feature networks.")
@click.option(
    "--n-way",
    default=PAPER_N_WAY,
    show_default=True,
    type=click.IntRange(min=2),
    help=f"Retrieval candidates per draw (the paper: {PAPER_N_WAY}).",
)
@click.option(
    "--n-draws",
    default=PAPER_N_DRAWS,
    show_default=True,
    type=click.IntRange(min=1),
    help=f"Retrieval draws (the paper: {PAPER_N_DRAWS}).",
)
@click.pass_obj
def evaluate(
    g,
    recons_dir,
    images_dir,
    clip_voxels,
    metrics_text,
    weights_dir,
    captions_file,
    references_file,
    out_dir,
    device,
    n_way,
    n_draws,
):
    """Score reconstructions as MindEye2's Table 1 does (spec §6), next to the paper's figures.

    \b
    Low-level: PixCorr, SSIM (425 px, grey SSIM with a Gaussian window).
    High-level: two-way identification on AlexNet(2), AlexNet(5), InceptionV3, CLIP ViT-L/14;
    correlation distance on EfficientNet-B1 and SwAV-ResNet50 (weights from --weights).
    Retrieval (with --clip-voxels): 300-way top-1 both ways over 30 random draws, mean and 95% interval.
    Captions (with --captions and --references): METEOR, ROUGE-1, ROUGE-L, sentence similarity,
    each where its data or model is present ([models] sentence_model_dir; nltk data for METEOR).
    Writes OUT/evaluation.json and OUT/evaluation.html.
    """
    from rtdecode.evaluate.evaluation import Evaluation, evaluate_captions, evaluate_images, parse_metrics
    from rtdecode.evaluate.images import load_pairs
    from rtdecode.evaluate.report import write_report

    config, _ = g.load()
    metrics = parse_metrics(metrics_text)
    pairs = load_pairs(recons_dir, images_dir)
    click.echo(f"evaluate: {len(pairs)} pairs from {recons_dir} and {images_dir}")
    brain = read_clip_voxels(clip_voxels, pairs.ids) if clip_voxels else None  # inputs checked before any work
    if brain is not None and config.models.image_embedder is None:
        raise ConfigError("--clip-voxels needs [models] image_embedder (the bigG weight file) to embed the images")
    captions = None
    if captions_file or references_file:
        captions = (_read_json(captions_file, "--captions"), _read_json(references_file, "--references"))
    weights_dir = weights_dir or config.models.metric_networks_dir
    results = evaluate_images(
        pairs.recons, pairs.images, metrics, weights_dir=weights_dir, device=device, say=click.echo
    )
    scores = _retrieval(config, pairs, brain, n_way, n_draws, device) if brain is not None else None
    caption_scores, not_computed = {}, {}
    if captions is not None:
        caption_scores, not_computed = evaluate_captions(
            pairs.ids, *captions, sentence_model_dir=config.models.sentence_model_dir, device=device
        )
    evaluation = Evaluation(pairs.ids, tuple(results), scores, not_computed, caption_scores)
    json_path, html_path = write_report(out_dir, evaluation, pairs)
    for result in results:
        value = "undefined" if result.value is None else f"{result.value:.4f}"
        undefined = f" ({result.n_undefined} pairs undefined)" if result.n_undefined else ""
        click.echo(f"  {result.label:<8s} {value}{undefined}")
    if scores is not None:
        click.echo(
            f"  retrieval {scores.n_way}-way: image {scores.forward:.3f} ± {scores.forward_ci95:.3f}, "
            f"brain {scores.backward:.3f} ± {scores.backward_ci95:.3f}"
        )
    for name, value in caption_scores.items():
        click.echo(f"  {name:<8s} {value['mean']:.4f}")
    for name, reason in not_computed.items():
        click.echo(f"  {name}: not computed: {reason}")
    click.echo(f"evaluate: wrote {json_path} and {html_path}")


def _read_json(path: Path | None, option: str) -> dict:
    if path is None:
        raise ConfigError("--captions and --references go together")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option} {path}: not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} {path}: must be a JSON object keyed by picture id")
    return value


def read_clip_voxels(path: Path, ids: tuple[str, ...]) -> np.ndarray:
    """The rows of ``path`` (.npz: ``ids``, ``clip_voxels``) in the order of ``ids``; every id must be there."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            file_ids = [str(value) for value in archive["ids"]]
            rows = np.asarray(archive["clip_voxels"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"--clip-voxels {path}: an .npz with 'ids' and 'clip_voxels' is needed ({err})") from None
    if rows.shape[0] != len(file_ids):
        raise ConfigError(f"--clip-voxels {path}: {len(file_ids)} ids but {rows.shape[0]} rows of clip_voxels")
    index = {image_id: row for row, image_id in enumerate(file_ids)}
    missing = [image_id for image_id in ids if image_id not in index]
    if missing:
        raise ConfigError(f"--clip-voxels {path}: no row for {len(missing)} of the pictures ({', '.join(missing[:8])})")
    return rows[[index[image_id] for image_id in ids]]


def _retrieval(config, pairs, clip_voxels: np.ndarray, n_way: int, n_draws: int, device: str):
    import torch

    from rtdecode.evaluate.retrieval import normalised_rows, retrieval
    from rtdecode.models.embedder import ImageEmbedder

    brain = normalised_rows(torch.from_numpy(clip_voxels))
    embedder = ImageEmbedder.from_weights(
        config.models.image_embedder, scaling=config.models.image_embedder_scaling, device=device
    )
    image = normalised_rows(embedder.embed(pairs.images.to(device)).cpu())
    if image.shape != brain.shape:
        raise ConfigError(
            f"--clip-voxels rows have {brain.shape[1]} values but the image embedder gives {image.shape[1]}"
        )
    return retrieval(brain, image, n_way=n_way, n_draws=n_draws)
