"""The HTML report: every section renders from a synthetic run directory written in the ARCHITECTURE §3
formats, user strings are escaped, the file is self-contained, and headless Chromium renders it (screenshot
test)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import evidrift  # noqa: F401  (before timm)
from evidrift.core.io import write_csv_atomic, write_parquet_atomic, write_text_atomic
from evidrift.core.maps_store import write_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.data.phantom import CLASSES, render_phantom, to_png_bytes
from evidrift.report.map_sections import pick_examples
from evidrift.studies.config import StudyConfig, dump_yaml, parse_config
from evidrift.studies.drift.report import build_report

METRICS = (
    "topk_iou@0.2",
    "centroid_shift",
    "peak_shift",
    "zone_tv",
    "spearman",
    "ssim",
    "js",
    "entropy_change",
)


def _blob(h: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def make_synthetic_run(
    root: Path,
    classes: Sequence[str] = CLASSES,
    archs: Sequence[str] = ("densenet201", "resnet50v2"),
    methods: Sequence[str] = ("gradcam++", "layercam", "gradcam"),
    per_class: int = 3,
    size: int = 64,
) -> RunPaths:
    """A finished-looking run directory: phantom images + masks, manifest, classification table, maps store
    (8×8 blobs at the lesion, moved at stage 2), drift table, summary/rankings/reversals, localization."""
    paths = RunPaths.at(root)
    rng = np.random.default_rng(0)
    config = parse_config(
        {
            "models": [{"arch": a} for a in archs],
            "explain": {"methods": list(methods)},
            "report": {"examples": 2},
        }
    )
    write_text_atomic(paths.config, dump_yaml(config))
    rows, centres = [], {}
    for c, label in enumerate(classes):
        for k in range(per_class + 2):
            image, mask = render_phantom(CLASSES[c % len(CLASSES)], np.random.default_rng(100 * c + k), size)
            image_id = f"{c}_{k}"
            image_path = root / "images" / f"{image_id}.png"
            mask_path = root / "images" / f"{image_id}_mask.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image_path.write_bytes(to_png_bytes(image))
            mask_path.write_bytes(to_png_bytes(mask))
            split = "test" if k < per_class else ("train" if k == per_class else "val")
            status = "skipped: truncated PNG" if (c == 0 and k == per_class) else "ok"
            rows.append(
                {
                    "id": image_id,
                    "path": str(image_path),
                    "label": label,
                    "label_idx": c,
                    "split": split,
                    "patient_id": None,
                    "mask_path": str(mask_path),
                    "bbox": None,
                    "status": status,
                }
            )
            ys, xs = np.nonzero(mask)
            centres[image_id] = (ys.mean() / size * 8, xs.mean() / size * 8) if len(ys) else (4.0, 4.0)
    manifest = pd.DataFrame(rows)
    write_parquet_atomic(paths.manifest, manifest)
    write_text_atomic(paths.data_dir / "classes.json", json.dumps(list(classes)))
    test_ids = manifest.loc[(manifest["split"] == "test") & (manifest["status"] == "ok"), "id"].tolist()
    cls_rows, drift_rows = [], []
    for a, arch in enumerate(archs):
        for stage in (1, 2):
            acc = 0.6 + 0.1 * stage + 0.05 * a
            cls_rows.append(
                {
                    "arch": arch,
                    "stage": stage,
                    "n": len(test_ids),
                    "accuracy": acc,
                    "accuracy_lo": acc - 0.1,
                    "accuracy_hi": acc + 0.08,
                    "macro_f1": acc - 0.05,
                    "macro_f1_lo": acc - 0.15,
                    "macro_f1_hi": acc,
                    "macro_auroc": acc + 0.1,
                    "macro_auroc_lo": acc,
                    "macro_auroc_hi": 0.99,
                }
            )
        for m, method in enumerate(methods):
            maps1, maps2 = [], []
            for n, image_id in enumerate(test_ids):
                cy, cx = centres[image_id]
                maps1.append(_blob(8, cy, cx, 1.2))
                shift = rng.normal(0, 1.0 + a + 0.5 * m, 2)
                maps2.append(_blob(8, cy + shift[0], cx + shift[1], 1.5))
                if a == 0 and m == 0 and n == 0:
                    maps2[-1] = np.zeros((8, 8), np.float32)  # a degenerate stage-2 map
                iou = float(np.clip(0.9 - 0.12 * np.hypot(*shift), 0, 1))
                drift_rows.append(
                    {
                        "id": image_id,
                        "arch": arch,
                        "method": method,
                        "topk_iou@0.2": iou,
                        "centroid_shift": float(np.hypot(*shift) / 11.3),
                        "peak_shift": float(np.hypot(*shift) / 10),
                        "zone_tv": float(rng.uniform(0, 0.4)),
                        "spearman": float(rng.uniform(0.2, 1)),
                        "ssim": float(rng.uniform(0.3, 1)),
                        "js": float(rng.uniform(0, 0.3)),
                        "entropy_change": float(rng.normal(0, 0.05)),
                        "degenerate": False,
                        "degenerate_reason": "",
                    }
                )
                if a == 0 and m == 0 and n == 0:
                    drift_rows[-1].update(
                        {"topk_iou@0.2": float("nan"), "degenerate": True, "degenerate_reason": "b: all zero"}
                    )
            for stage, maps in ((1, maps1), (2, maps2)):
                write_maps_shard(
                    paths, arch, stage, method, 0, torch.tensor(np.stack(maps[:3])), test_ids[:3], "layer"
                )
                write_maps_shard(
                    paths, arch, stage, method, 1, torch.tensor(np.stack(maps[3:])), test_ids[3:], "layer"
                )
    write_csv_atomic(paths.eval_table("classification").with_suffix(".csv"), pd.DataFrame(cls_rows))
    drift = pd.DataFrame(drift_rows)
    write_parquet_atomic(paths.drift, drift)
    summary_rows, rank_rows = [], []
    for metric in METRICS:
        for method in methods:
            means = {}
            for arch in archs:
                v = drift.loc[(drift["arch"] == arch) & (drift["method"] == method), metric].dropna()
                means[arch] = float(v.mean())
                summary_rows.append(
                    {
                        "arch": arch,
                        "method": method,
                        "metric": metric,
                        "n": len(v),
                        "mean": v.mean(),
                        "median": v.median(),
                        "std": v.std(),
                        "ci_low": v.quantile(0.1),
                        "ci_high": v.quantile(0.9),
                    }
                )
            higher = metric in ("topk_iou@0.2", "spearman", "ssim")
            order = sorted(archs, key=lambda x: -means[x] if higher else means[x])
            rank_rows += [
                {"method": method, "metric": metric, "arch": x, "rank": order.index(x) + 1, "mean": means[x]}
                for x in archs
            ]
    write_csv_atomic(paths.summary, pd.DataFrame(summary_rows))
    write_csv_atomic(paths.rankings, pd.DataFrame(rank_rows))
    reversal = {
        "metric": "spearman",
        "method_a": methods[0],
        "method_b": methods[-1],
        "arch_x": archs[0],
        "arch_y": archs[-1],
        "diff_under_a": 0.05,
        "diff_under_b": -0.04,
        "significant_a": True,
        "significant_b": False,
    }
    write_csv_atomic(
        paths.reversals, pd.DataFrame([reversal] if len(archs) > 1 else [], columns=list(reversal))
    )
    loc_rows = [
        {
            "arch": arch,
            "method": method,
            "stage": stage,
            "metric": metric,
            "n": 10,
            "mean": 0.5 + 0.1 * stage,
            "ci_low": 0.4,
            "ci_high": 0.8,
        }
        for arch in archs
        for method in methods
        for stage in (1, 2)
        for metric in ("pointing_game", "energy_pointing_game", "mask_iou@0.2")
    ]
    write_csv_atomic(paths.root / "localization_summary.csv", pd.DataFrame(loc_rows))
    return paths


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
