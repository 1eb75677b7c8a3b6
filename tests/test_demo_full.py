"""`evidrift demo --full`: the paper-size preset, its CPU time estimate printed before starting, --yes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import evidrift  # noqa: F401  (before timm)
from evidrift.cli import study as cli_study
from evidrift.cli.app import app
from evidrift.studies.config import parse_config
from evidrift.studies.drift.budget import estimate_cpu_seconds, format_duration
from evidrift.studies.drift.presets import demo_config


def test_full_preset_has_the_paper_sizes() -> None:
    config = demo_config(full=True)
    assert {m.arch: m.image_size for m in config.models} == {
        "densenet201": 224,
        "resnet50v2": 224,
        "inceptionv3": 299,
    }
    assert config.data.phantom.n >= 1000 and config.data.phantom.n_source >= 1000
    assert str(config.output.dir).endswith("demo-full")
    with pytest.raises(ValueError, match="--quick and --full"):
        demo_config(quick=True, full=True)


def _study(**train: Any) -> Any:
    return parse_config(
        {
            "data": {"phantom": {"n": 100, "n_source": 200}, "split": {"val": 0.1, "test": 0.2}},
            "models": [{"arch": "resnet50v2", "image_size": 128}],
            "train": train,
        }
    )


def test_estimate_scales_with_work_threads_and_precision() -> None:
    one = estimate_cpu_seconds(_study(stage2={"epochs": 2}))
    more = estimate_cpu_seconds(_study(stage2={"epochs": 4}))
    assert 0 < one < more
    assert estimate_cpu_seconds(_study(stage2={"epochs": 2}), bf16=False) > one
    assert estimate_cpu_seconds(_study(stage2={"epochs": 2}), threads=2) == pytest.approx(one / (2 * 0.85))
    # a pretrained model skips stage 0
    pretrained = _study(stage2={"epochs": 2}).model_copy(deep=True)
    pretrained.models[0].weights = "imagenet"
    assert estimate_cpu_seconds(pretrained) < one
    assert estimate_cpu_seconds(demo_config(full=True)) > 10 * estimate_cpu_seconds(demo_config())


def test_format_duration() -> None:
    assert format_duration(40.2) == "40 s"
    assert format_duration(12 * 60 + 10) == "12 min"
    assert format_duration(3900) == "1 h 05 min"


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace the study run by a recorder of the config it was given."""
    calls: list[Any] = []
    monkeypatch.setattr(cli_study, "_run_and_report", lambda config, *args: calls.append(config))
    return calls


def test_full_on_cpu_prints_the_estimate_and_can_be_declined(tmp_path: Path, recorded: list[Any]) -> None:
    result = CliRunner().invoke(app, ["demo", "--full", "--out", str(tmp_path / "d")], input="n\n")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "demo --full on CPU" in text and "estimated" in text and "Start it?" in text
    assert "not started" in text and recorded == []


def test_full_without_a_terminal_answer_does_not_start(tmp_path: Path, recorded: list[Any]) -> None:
    result = CliRunner().invoke(app, ["demo", "--full", "--out", str(tmp_path / "d")], input="")
    assert result.exit_code == 0, result.output
    assert "not started" in result.output and recorded == []


def test_full_yes_starts_without_asking(tmp_path: Path, recorded: list[Any]) -> None:
    result = CliRunner().invoke(app, ["demo", "--full", "--yes", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "estimated" in result.output and "Start it?" not in result.output
    assert len(recorded) == 1 and recorded[0].models[2].image_size == 299


def test_quick_and_full_together_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--full", "--quick"])
    assert result.exit_code == 2 and "--quick and --full" in result.output
