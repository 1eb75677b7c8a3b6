"""`evidrift compare`: identical checkpoints give IoU 1 and shifts 0, the gates' exit codes and messages,
and a clear error for checkpoints of different architectures or class lists."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import evidrift  # noqa: F401  (before timm)
from builders import write_checkpoint
from evidrift.classifier.checkpoint import read_checkpoint_meta
from evidrift.classifier.config import HeadConfig
from evidrift.classifier.models import build_model, get_head
from evidrift.cli.app import app
from evidrift.data.phantom import CLASSES
from evidrift.studies.compare.study import CompareError, check_compatible, check_gates

runner = CliRunner()


def _checkpoint(path: Path, seed: int, classes: list[str] | None = None, arch: str = "resnet18") -> Path:
    classes = list(classes or CLASSES)
    torch.manual_seed(seed)
    model = build_model(arch, len(classes), HeadConfig(), "none").eval()
    with torch.no_grad():  # trained-scale logits: spread the head so the CAM gradients are not tiny
        for parameter in get_head(model).parameters():
            parameter.mul_(20)
    return write_checkpoint(path, model, arch, classes, config_hash=f"test{seed}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    return {
        "a": _checkpoint(folder / "a.safetensors", 0),
        "b": _checkpoint(folder / "b.safetensors", 1),
    }


def _compare(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["compare", *args])
    return result.exit_code, result.output


@pytest.mark.slow  # `evidrift compare` end to end
def test_identical_checkpoints_have_no_drift_and_pass_the_gates(
    checkpoints: dict[str, Path], tiny_phantom_set: Path, tmp_path: Path
) -> None:
    a = str(checkpoints["a"])
    code, output = _compare(
        a,
        a,
        "--data",
        str(tiny_phantom_set),
        "--out",
        str(tmp_path / "same"),
        "--methods",
        "gradcam",
        "--methods",
        "layercam",
        "--fail-below",
        "topk_iou@0.2=0.999",
        "--fail-above",
        "centroid_shift=0",
    )
    assert code == 0, output
    assert "all 2 gate(s) passed" in output
    drift = pd.read_parquet(tmp_path / "same" / "drift.parquet")
    assert len(drift) == 2 * 20
    ok = drift[~drift["degenerate"]]
    assert len(ok) > 0
    for k in (0.05, 0.1, 0.2, 0.3):
        assert (ok[f"topk_iou@{k:g}"] == 1.0).all()
    assert (ok["centroid_shift"].abs() < 1e-9).all() and (ok["peak_shift"] == 0).all()
    assert (ok["spearman"] > 1 - 1e-6).all() and (ok["js"].abs() < 1e-9).all()
    html = (tmp_path / "same" / "report.html").read_text(encoding="utf-8")
    assert "A (a.safetensors)" in html


@pytest.mark.slow  # `evidrift compare` end to end
def test_different_checkpoints_fail_a_gate_with_exit_1_naming_metric_threshold_value(
    checkpoints: dict[str, Path], tiny_phantom_set: Path, tmp_path: Path
) -> None:
    code, output = _compare(
        str(checkpoints["a"]),
        str(checkpoints["b"]),
        "--data",
        str(tiny_phantom_set),
        "--out",
        str(tmp_path / "diff"),
        "--methods",
        "gradcam",
        "--fail-below",
        "topk_iou@0.2=0.999",
        "--fail-above",
        "js=1",
    )
    assert code == 1, output
    summary = pd.read_csv(tmp_path / "diff" / "summary.csv")
    value = summary.loc[
        (summary["metric"] == "topk_iou@0.2") & (summary["method"] == "gradcam"), "mean"
    ].item()
    assert value < 0.999
    assert f"topk_iou@0.2 under gradcam (resnet18): mean {value:.4f} < 0.999" in " ".join(output.split())
    assert output.count("gate failed:") == 1  # the js gate passed


def test_check_gates_messages_and_unknown_metric() -> None:
    summary = pd.DataFrame(
        [
            {"arch": "m", "method": "gradcam", "metric": "topk_iou@0.2", "n": 5, "mean": 0.4},
            {"arch": "m", "method": "layercam", "metric": "topk_iou@0.2", "n": 5, "mean": 0.7},
            {"arch": "m", "method": "gradcam", "metric": "centroid_shift", "n": 5, "mean": float("nan")},
        ]
    )
    assert check_gates(summary, {"topk_iou@0.2": 0.5}, {}) == [
        "topk_iou@0.2 under gradcam (m): mean 0.4000 < 0.5 (--fail-below topk_iou@0.2=0.5; n = 5 images)"
    ]
    assert check_gates(summary, {"iou@0.2": 0.3}, {}) == []  # alias, both pass
    assert len(check_gates(summary, {}, {"centroid_shift": 0.1})) == 1  # NaN never passes
    with pytest.raises(CompareError, match="gate metric 'ioux': unknown drift metric"):
        check_gates(summary, {"ioux": 0.5}, {})
    with pytest.raises(CompareError, match=r"'dice@0\.2' was not computed"):
        check_gates(summary, {"dice@0.2": 0.5}, {})


def test_mismatched_checkpoints_are_a_clear_error(
    checkpoints: dict[str, Path], tmp_path: Path, tiny_phantom_set: Path
) -> None:
    other = _checkpoint(tmp_path / "other.safetensors", 0, classes=["normal", "covid19"])
    code, output = _compare(
        str(checkpoints["a"]), str(other), "--data", str(tiny_phantom_set), "--out", str(tmp_path / "x")
    )
    assert code == 2
    text = " ".join(output.split())
    assert (
        "different class lists" in text
        and "only in A: ['bacterial_pneumonia', 'tuberculosis', 'viral_pneumonia']" in text
    )
    meta = read_checkpoint_meta(checkpoints["a"])
    with pytest.raises(CompareError, match=r"different architectures: .* is 'resnet18', .* is 'resnet34'"):
        check_compatible(Path("a"), meta, Path("b"), meta.model_copy(update={"timm_name": "resnet34"}))
    with pytest.raises(CompareError, match="same names in another order"):
        check_compatible(Path("a"), meta, Path("b"), meta.model_copy(update={"classes": meta.classes[::-1]}))
    code, output = _compare(
        str(checkpoints["a"]), str(tmp_path / "missing.safetensors"), "--data", str(tiny_phantom_set)
    )
    assert code == 2 and "missing.safetensors" in output
    code, output = _compare(
        str(checkpoints["a"]),
        str(checkpoints["a"]),
        "--data",
        str(tiny_phantom_set),
        "--fail-below",
        "topk_iou",
    )
    assert code == 2 and "METRIC=VALUE" in output
