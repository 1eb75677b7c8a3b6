"""``evidrift diffusion study.yaml`` / ``evidrift diffusion --quick [--out DIR]``: the command function.

Registered in ``evidrift.cli.app`` with one line (``app.command("diffusion")(diffusion)``). User errors
(``EvidriftError``: a bad ``diffusion:`` section, a model folder that cannot be loaded, an unknown step)
exit with code 2 and a one-line message; every other exception keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_OUT = Path("runs/diffusion")


def diffusion(
    study: Annotated[Path | None, typer.Argument(help="study file with a `diffusion:` section")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="the quick preset (tests, < 2 min)")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: output.dir or runs/diffusion)")
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="redo this step and what reads it (or all)")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="stop after this step")] = None,
) -> None:
    """Diffusion study (Dombrowski et al.): does fine-tuning a text-to-image model (text encoder frozen,
    learnable, cross-attention only) trade its cross-attention maps' localization for image fidelity?
    Writes localization.csv, localization_timestep.csv, localization_layer.csv, fidelity.csv, drift.csv,
    gates.csv, verdict.json and report.html. Resumable."""
    from evidrift.core.errors import EvidriftError
    from evidrift.studies.diffusion.config import DiffusionConfigError, load_diffusion, preset
    from evidrift.studies.diffusion.pipeline import run_study

    try:
        if study is not None and quick:
            raise DiffusionConfigError("give a study file or --quick, not both")
        if study is None:
            config, configured_out = preset("quick" if quick else "default"), None
        else:
            config, configured_out = load_diffusion(study)
        run_dir = out or configured_out or DEFAULT_OUT
        paths = run_study(config, run_dir, force=force or (), until=until, log=typer.echo)
    except EvidriftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    verdict = paths.root / "verdict.json"
    if verdict.is_file():
        typer.echo(f"verdict: {verdict.read_text(encoding='utf-8').strip()}")
    typer.echo(f"report: {paths.report}")
