"""``evidrift diffusion study.yaml`` / ``evidrift diffusion --quick [--out DIR]``: the command function.

Registered in ``evidrift.cli.app`` (``COMMANDS``), whose ``user_errors`` wrapper turns an ``EvidriftError``
(a bad ``diffusion:`` section, a model folder that cannot be loaded, an unknown step) into exit code 2 and a
one-line message; every other exception keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evidrift.cli.output import console

DEFAULT_OUT = Path("runs/diffusion")


def _echo(line: str) -> None:
    console.print(line, highlight=False, markup=False)


def diffusion(
    study: Annotated[Path | None, typer.Argument(help="study file with a `diffusion:` section")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="the quick preset (tests, < 2 min)")] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="run directory (default: {output.dir}/diffusion, else runs/diffusion)"),
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="redo this step and every later step (or all)")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="stop after this step")] = None,
) -> None:
    """Diffusion study (Dombrowski et al.): does fine-tuning a text-to-image model (text encoder frozen,
    learnable, cross-attention only) trade its cross-attention maps' localization for image fidelity?
    Writes localization.csv, localization_timestep.csv, localization_layer.csv, fidelity.csv, drift.csv,
    gates.csv, verdict.json and report.html. Resumable."""
    import json

    from evidrift.core.errors import UsageError
    from evidrift.studies.diffusion.config import load_diffusion, preset
    from evidrift.studies.diffusion.pipeline import run_study

    if study is not None and quick:
        raise UsageError("give a study file or --quick, not both")
    if study is None:
        config, configured_out = preset("quick" if quick else "default"), None
    else:
        config, configured_out = load_diffusion(study)
    # a study file's output.dir is shared with its other studies: the diffusion study gets a folder there
    # (its step names, e.g. data and report, and report.html would collide with the drift study's)
    run_dir = out or (configured_out / "diffusion" if configured_out is not None else DEFAULT_OUT)
    paths = run_study(config, run_dir, force=force or (), until=until, log=_echo)
    verdict = paths.root / "verdict.json"
    if verdict.is_file():
        record = json.loads(verdict.read_text(encoding="utf-8"))
        failed = ", ".join(record["failed"]) or "none"
        _echo(f"verdict: {record['verdict']} (failed gates: {failed})")
    if paths.report.is_file():
        _echo(f"report: {paths.report}")
