"""``rtdecode demo``: loaded by rtdecode's CLI by name (the runtime never imports calibration)."""

import datetime
import time
from pathlib import Path

import click

from rtdecode.view.cli import DEFAULT_LISTEN


@click.command("demo")
@click.option("--quick", is_flag=True, help="A smaller model and a faster run (about a minute; CI runs it).")
@click.option("--workdir", type=click.Path(path_type=Path), help="Default: $RTDECODE_HOME/demo/<time>.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Default: $RTDECODE_HOME/demo-cache.")
@click.option(
    "--view", is_flag=True, help="Serve the operator display's page during the run, and after it until Ctrl-C."
)
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT", help="Where --view serves.")
@click.option("--open", "open_page", is_flag=True, help="With --view: open a browser on the page.")
@click.pass_obj
def demo(g, quick, workdir, cache_dir, view, listen, open_page) -> None:
    """The whole system on this machine: no scanner, no GPU, no downloaded weights.

    \b
    1. builds (first run only; then reused from the cache) a small model on the synthetic world
       with the real trainer and calibration code: pretraining on 7 synthetic subjects,
       calibrating an 8th from its simulated DICOM session;
    2. plays one more run of that subject live: a simulated scanner writes DICOM at 8x real time
       (16x with --quick) with faults injected, a simulated stimulus program logs each trial;
    3. serves it with the real daemon and records what an operator display receives
       (WORKDIR/display, as `rtdecode view --save` writes it); with --view, also shows the
       display's web page (open the printed address);
    4. prints a summary: volumes, trials decoded, retrieval accuracy against the simulation's
       truth, latency per stage, and WORKDIR/gallery.html, each trial's seen picture beside the
       pictures it decoded to.
    """
    from calibration.demo import DEMO_FAULTS, DemoSettings, build_model, play_live, require_empty
    from calibration.demo_report import summary
    from rtdecode.view.cli import checked_listen, open_browser, stop_on_signals
    from rtdecode.view.server import ViewServer
    from rtdecode.view.state import DisplayState

    config, _ = g.load()
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    workdir = workdir or config.home / "demo" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    require_empty(workdir)  # before the build, which can take a minute
    state = DisplayState(fd_threshold_mm=config.preprocess.fd_threshold_mm)
    if open_page and not view:
        raise click.UsageError("--open needs --view (the page to open)")
    listen_address = checked_listen(listen, allow_remote=False) if view else None
    started_s = time.monotonic()
    model = build_model(settings, cache_dir or config.home / "demo-cache", click.echo)
    page = ViewServer(state, *listen_address, pool_images_dir=model.pool_images) if view else None
    try:
        if page is not None:
            page.start()
            click.echo(f"view: the operator display is at {page.url}")
            if open_page:
                open_browser(page.url)
        result = play_live(settings, model, workdir, click.echo, state=state)
        built = f"built in {model.built_s:.0f} s" if model.built_s else "reused from the cache"
        click.echo(summary(result, f"{built} ({model.folder})", time.monotonic() - started_s, DEMO_FAULTS))
        if page is not None:
            with stop_on_signals() as stop:  # before the line: a Ctrl-C right after it ends cleanly
                click.echo(f"view: the page stays up at {page.url}; Ctrl-C ends")
                while not stop.wait(0.5):
                    pass
    finally:
        if page is not None:
            page.stop()
