"""The HTML report: every section renders from a synthetic run directory written in the ARCHITECTURE §3
formats, user strings are escaped, the file is self-contained, and headless Chromium renders it (screenshot
test)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import evidrift  # noqa: F401  (before timm)
from builders import make_synthetic_run
from evidrift.core.io import write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.report.map_sections import pick_examples
from evidrift.studies.config import StudyConfig, dump_yaml
from evidrift.studies.drift.report import build_report


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = make_synthetic_run(tmp_path_factory.mktemp("run"))
    return build_report(paths.root)


def _embedded_images(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_has_every_section_and_is_self_contained(synthetic_report: Path) -> None:
    html = synthetic_report.read_text(encoding="utf-8")
    for heading in (
        "Dataset",
        "Classification",
        "Explanation drift",
        "Rankings and rank reversals",
        "Metric distributions",
        "typical and most-drifted",
        "zone masses",
        "Localization against",
        "Degenerate maps",
        "Resolved configuration",
    ):
        assert heading in html, heading
    images = _embedded_images(html)
    # classification, rankings, distributions, 2 archs × 3 methods overlays, 2 zone charts, localization
    assert len(images) == 1 + 1 + 1 + 6 + 2 + 1
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    written = sorted(p.name for p in (synthetic_report.parent / "figures").glob("*.png"))
    assert len(written) == len(images)
    assert "overlay_densenet201_gradcampp.png" in written
    # nothing is fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # the skipped file and its reason, the degenerate map, the reversal and the CI format appear
    assert "truncated PNG" in html
    assert re.search(
        r"<td[^>]*>1</td>\s*<td[^>]*>1</td>\s*</tr>", html
    )  # degenerate stage-2 map + flagged row
    assert "1 reversal found" in html
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", html)
    config = StudyConfig()
    assert f"seed</td><td><code>{config.seed}</code>" in html


def test_class_names_are_escaped(tmp_path: Path) -> None:
    # model names are folder names restricted to letters, digits, '-', '_' and '.' (config: a name such as
    # "<b>net</b>" is an error, tests/test_silent_failures.py), so markup can only come from class names
    evil = '<script>alert("x")</script>'
    paths = make_synthetic_run(
        tmp_path, classes=(evil, "normal"), archs=("resnet18",), methods=("gradcam",), per_class=2
    )
    html = build_report(paths.root).read_text(encoding="utf-8")
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


def test_partial_run_reports_what_is_missing(tmp_path: Path) -> None:
    paths = RunPaths.at(tmp_path)
    write_text_atomic(paths.config, dump_yaml(StudyConfig()))
    html = build_report(paths.root).read_text(encoding="utf-8")
    assert "the data step has not run" in html
    assert "the drift step has not run" in html


def test_pick_examples_median_and_lowest() -> None:
    values = pd.Series([0.9, 0.1, 0.5, 0.42, float("nan"), 0.2, 0.55, 0.7], index=list("abcdefgh"))
    typical, drifted = pick_examples(values, 2)
    assert drifted == ["b", "f"]
    assert typical == ["c", "g"]  # median of the finite values is 0.5: c (0), g (0.05), d (0.08)
    assert pick_examples(values, 0) == ([], [])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(synthetic_report: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1400,3000",
                synthetic_report.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (3000, 1400)
    header = pixels[:60, :, :]  # the dark header band is drawn: the CSS applied
    assert header.mean() < 120
    body = pixels[200:, :, :]
    assert body.std() > 20  # figures and tables, not a blank page


def test_report_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evidrift.cli.app import app

    paths = make_synthetic_run(
        tmp_path / "run",
        classes=("normal", "covid19"),
        archs=("resnet18",),
        methods=("gradcam",),
        per_class=2,
    )
    result = CliRunner().invoke(app, ["report", str(paths.root)])
    assert result.exit_code == 0, result.output
    assert str(paths.report.resolve()) in "".join(result.output.split())
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a directory" in missing.output


def test_p_values_never_print_as_zero() -> None:
    from evidrift.report.elements import fmt_p

    assert fmt_p(0.54212) == "0.542"
    assert fmt_p(0.001) == "0.001"
    assert fmt_p(1.64e-06) == "1.6e-06"
    assert fmt_p(float("nan")) == "n/a"
