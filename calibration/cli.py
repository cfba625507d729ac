"""``rtdecode calibrate`` and ``rtdecode bench calibrate`` (rtdecode's CLI loads these lazily)."""

from pathlib import Path

import click


@click.command("calibrate")
@click.option("--subject", help="Subject id (default: subject.id).")
@click.option("--session", type=click.IntRange(1, 999), help="Calibration session (default: subject.session).")
@click.option("--raw", "raw_dir", type=click.Path(path_type=Path), help="Volume files (default: the session's raw/).")
@click.option(
    "--events",
    "events",
    multiple=True,
    type=click.Path(path_type=Path),
    help="events.tsv of run 1, then run 2, ... (repeat; default: the session's events/*.tsv).",
)
@click.option("--images", "images_dir", type=click.Path(path_type=Path), help="Stimulus images <stimulus_id>.png.")
@click.option("--mask", type=click.Path(path_type=Path), help="Region mask on the reference grid (no selection).")
@click.option("--reference", type=click.Path(path_type=Path), help="The volume --mask was drawn on (NIfTI).")
@click.option("--pretrained", type=click.Path(path_type=Path), help="Model bundle to fine-tune from.")
@click.option("--from-scratch", is_flag=True, help="Train a new model instead of fine-tuning.")
@click.option("--epochs", type=click.IntRange(min=1), help="Fine-tuning epochs (default: calibrate.epochs, 150).")
@click.option("--work-dir", type=click.Path(path_type=Path), help="Work folder (default: the session's calibration/).")
@click.option("--restart", is_flag=True, help="Set the work folder aside (kept) and start from the first step.")
@click.pass_context
def calibrate(
    ctx: click.Context,
    subject,
    session,
    raw_dir,
    events,
    images_dir,
    mask,
    reference,
    pretrained,
    from_scratch,
    epochs,
    work_dir,
    restart,
) -> None:
    """One session of a new subject -> the subject bundle `rtdecode serve --subject ID` reads.

    \b
    Steps (settings: [calibrate], and [glm], [preprocess], [scanner] exactly as the daemon uses them):
      1. read the stimulus log (BIDS events.tsv per run, optional 'split' column marking held-out trials)
         and check every stimulus image is there;
      2. read the runs once with the live ingest code and check them against the log; the reference
         volume is the first volume of calibrate.reference_run;
      3. motion-correct each run onto the reference and compute every trial's beta with the live GLM
         (cached per run in the work folder);
      4. voxels: --mask, or those whose responses to repeated images are reliable (brain or search mask);
      5. z-score statistics of the train trials;
      6. fine-tune the pretrained model (new subject layer, all weights trained, paper recipe) or train
         from scratch, validating on the held-out trials every epoch (checkpointed, resumable);
      7. write report.json + report.html and the subject bundle ($RTDECODE_HOME/subjects/ID/bundle).

    An interrupted calibration resumes: run the same command again.

    \b
    Example:
      rtdecode calibrate --subject new01 --session 1 --pretrained models/multisubject_1024
    """
    from calibration.calibrate import calibrate as run_calibration
    from calibration.calibrate import set_aside, work_folder

    flags = {
        "subject.id": subject,
        "subject.session": session,
        "calibrate.raw_dir": raw_dir,
        "calibrate.events": tuple(events),
        "calibrate.images_dir": images_dir,
        "preprocess.mask": mask,
        "preprocess.reference": reference,
        "calibrate.pretrained": pretrained,
        "calibrate.from_scratch": True if from_scratch else None,
        "calibrate.epochs": epochs,
    }
    config = ctx.obj.load_subject(flags)
    work = Path(work_dir or work_folder(config, config.subject.id, config.subject.session))
    if restart and (moved := set_aside(work)) is not None:
        click.echo(f"earlier work set aside in {moved}")
    result = run_calibration(config, config.subject.id, config.subject.session, work_dir=work)
    click.echo(_summary(result))


def _summary(result) -> str:
    report = result.report
    selection, heldout = report["selection"], report["heldout"] or {}
    lines = [
        f"subject {report['subject']} session {report['session']}: {report['inputs']['n_trials']} trials "
        f"({report['inputs']['n_train']} train, {report['inputs']['n_heldout']} held out), "
        f"{selection['n_selected']} voxels ({selection['method']})",
    ]
    if heldout:
        lines.append(
            f"held-out retrieval ({heldout['n_way']}-way top-1): brain->image {heldout['forward']:.3f}, "
            f"image->brain {heldout['backward']:.3f} (chance {heldout['chance']:.3f})"
        )
    lines.append(f"report: {result.report_files[1]}")
    if result.bundle_dir is not None:
        lines.append(f"subject bundle: {result.bundle_dir}")
    return "\n".join(lines)


@click.command("calibrate")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-calibrate"),
    show_default=True,
    help="Work folder (the pretrained model and the simulated scan are reused from it).",
)
@click.option("--quick", is_flag=True, help="A tiny world and 3 epochs: checks the pipeline, the numbers mean little.")
def bench_calibrate(out_dir: Path, quick: bool) -> None:
    """Pretrained vs from-scratch calibration of one simulated session (MindEye2's one-hour claim).

    Pretrains on 7 synthetic subjects, writes one session of an 8th as DICOM, calibrates it with the real
    calibrate code from the pretrained model and from scratch, and prints 300-way single-trial held-out retrieval
    of both, their ratio, and the world's parameters. About 17 minutes on 2 CPU cores; reruns reuse the
    pretrained model and the scan.
    """
    from calibration.bench import BenchSettings, run_bench

    settings = BenchSettings.quick() if quick else BenchSettings()
    click.echo(run_bench(out_dir, settings))
