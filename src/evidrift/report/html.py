"""The generic HTML report renderer: one self-contained file from sections a study contributes.

``render_report(paths, ...)`` renders ``templates/report.html`` (jinja2, autoescape on: every user string is
escaped) with the sections (``report.elements.Section``) a study built, the run's step times, the library
versions and the config; figures are embedded as base64 PNG. The only unescaped fragment is ``extra_html``,
which its builder (the probe study's section) escapes value by value. Which sections a report has is the
studies' business (``studies.drift.report.build_report``, the compare and probe sections).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Sequence
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from evidrift.core.io import write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.report.elements import (
    Section,
)

TEMPLATES = Path(__file__).parent / "templates"


def environment() -> Environment:
    """The jinja2 environment of the report: autoescape on for every template, undefined names are errors."""
    return Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the results depend on (installed distributions' metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("evidrift", "torch", "timm", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def step_times(paths: RunPaths) -> str:
    """Step timings from the markers, e.g. "data 1.2 s · stage0 40.1 s" (wall-clock seconds of each step)."""
    parts = []
    for marker in sorted(paths.root.glob("steps/*.json"), key=lambda p: p.stat().st_mtime):
        if marker.name.endswith(".started.json"):
            continue
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if "seconds" in record:
            parts.append(f"{record.get('step', marker.stem)} {float(record['seconds']):.1f} s")
    return " · ".join(parts)


def render_report(
    paths: RunPaths,
    *,
    title: str,
    sections: Sequence[Section],
    config_text: str,
    seed: int,
    config_hash: str,
    subtitle: str = "",
    archs: Sequence[str] = (),
    methods: Sequence[str] = (),
    n_images: int = 0,
    extra_html: str = "",
) -> Path:
    """Write ``paths.report`` (``report.html``, self-contained) from ``sections``; returns its path.

    ``extra_html`` is inserted unescaped: its builder must have escaped every value in it."""
    context = {
        "title": title,
        "subtitle": subtitle,
        "archs": list(archs),
        "methods": list(methods),
        "n_images": n_images,
        "sections": list(sections),
        "extra_html": Markup(extra_html),
        "config_text": config_text,
        "footer": {
            "steps": step_times(paths),
            "versions": versions(),
            "seed": seed,
            "config_hash": config_hash,
            "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "run_dir": str(paths.root.resolve()),
        },
    }
    html = environment().get_template("report.html").render(**context)
    return write_text_atomic(paths.report, html)
