"""The diffusion study's quick preset end to end (issue 15): every table, the gates, resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from evidrift.studies.diffusion import gates as gt
from evidrift.studies.diffusion.config import preset
from evidrift.studies.diffusion.pipeline import run_study, study_steps

TABLES = (
    "localization.csv",
    "localization_images.csv",
    "localization_timestep.csv",
    "localization_layer.csv",
    "fidelity.csv",
    "fidelity_classes.csv",
    "drift.csv",
    "gates.csv",
)


def _ran(messages: list[str]) -> list[str]:
    """Step names of the runner's ``[step] done in X s`` lines."""
    return [m.split("]")[0].lstrip("[") for m in messages if " done in " in m]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("diffusion")
    messages: list[str] = []
    try:
        run_study(preset("quick"), out, log=messages.append)
    finally:
        torch.set_num_threads(threads)
    return out, messages


@pytest.mark.slow  # the quick preset end to end: ~30-40 s of CPU (make test-fast skips it)
def test_quick_preset_writes_every_table(quick_run):
    out, _ = quick_run
    for name in TABLES:
        assert (out / name).is_file(), name
        assert not pd.read_csv(out / name).empty, name
    assert (out / "report.html").is_file()
    config = preset("quick")
    models = ["base", *config.train.variants]
    loc = pd.read_csv(out / "localization.csv")
    test = pd.read_csv(out / "localization_images.csv")
    assert "normal" not in set(test["label"])  # the normal class is left out
    n_lesion = config.data.n_test - config.data.n_test // 5  # classes cycle: one in five is normal
    query = loc[(loc["kind"] == "query") & (loc["metric"] == "pixel_auroc")]
    assert set(query["model"]) == {*models, "random_unet"}
    assert (query["n"] + query["n_nan"] == n_lesion).all()
    assert {"start_token", "prior"} <= set(loc["kind"])
    assert (query["ci_low"] <= query["mean"]).all() and (query["mean"] <= query["ci_high"]).all()
    per_t = pd.read_csv(out / "localization_timestep.csv")
    assert sorted(per_t["timestep"].unique()) == config.attention.timesteps
    per_layer = pd.read_csv(out / "localization_layer.csv")
    # cross-attention: down blocks 1, 2 (one layer each), the middle block, up blocks 0, 1 (two layers each)
    assert per_layer["layer"].nunique() == 7
    fidelity = pd.read_csv(out / "fidelity.csv")
    assert list(fidelity["model"]) == [*models, "real"]
    assert fidelity["fd"].notna().all() and (fidelity["fd"] >= -1e-6).all()
    generated = fidelity[fidelity["model"] != "real"]
    assert generated[["fd_ci_low", "fd_ci_high", "accuracy_ci_low", "accuracy_ci_high"]].notna().all().all()
    assert (generated["fd_ci_low"] <= generated["fd_ci_high"]).all()
    drift = pd.read_csv(out / "drift.csv")
    assert set(drift["model"]) == set(config.train.variants)
    assert drift[["mean", "floor_mean"]].notna().all().all()


@pytest.mark.slow  # the quick preset end to end: ~30-40 s of CPU (make test-fast skips it)
def test_quick_preset_computes_the_gates(quick_run):
    out, _ = quick_run
    gates = pd.read_csv(out / "gates.csv")
    models = ["base", *preset("quick").train.variants]
    expected = {"marker", "twin", "baseline:random_unet", "baseline:start_token", "baseline:mean_mask_prior"}
    for model in models:
        assert set(gates.loc[gates["model"] == model, "gate"]) == expected
    assert gates["passed"].isin([True, False]).all()
    verdict = json.loads((out / "verdict.json").read_text())
    recomputed, failed = gt.verdict(gates, models)
    assert verdict == {"verdict": recomputed, "failed": failed}
    assert (verdict["verdict"] == "conclusive") == gates["passed"].all()


@pytest.mark.slow  # the quick preset end to end: ~30-40 s of CPU (make test-fast skips it)
def test_quick_preset_resumes(quick_run):
    out, _ = quick_run
    messages: list[str] = []
    torch.set_num_threads(1)
    run_study(preset("quick"), out, log=messages.append)
    assert sum("skipped" in m for m in messages) == len(study_steps())
    messages.clear()
    run_study(preset("quick"), out, force=["gates"], log=messages.append)
    assert _ran(messages) == ["gates", "report"]  # --force STEP redoes it and every later step
    assert (out / "gates.csv").is_file() and (out / "report.html").is_file()


def test_gate_verdict_rules():
    table = pd.DataFrame(
        {
            "model": ["base", "base", "frozen"],
            "gate": ["marker", "twin", "marker"],
            "passed": [True, True, False],
        }
    )
    assert gt.verdict(table, ["base"]) == ("conclusive", [])
    assert gt.verdict(table, ["base", "frozen"]) == ("inconclusive", ["frozen:marker"])
    spot = torch.zeros(6, 4, 4)
    spot[:, 1, 1] = 1.0  # every map peaks on the one-pixel marker
    hit = gt.marker_gate(spot + 0.1, spot.bool(), n_boot=200, seed=0)
    assert hit["value"] == 1.0 and hit["passed"] and hit["chance"] == pytest.approx(1 / 16)


def test_command_exits_2_on_a_bad_section(tmp_path):
    from typer.testing import CliRunner

    from evidrift.cli import app

    study = tmp_path / "study.yaml"
    study.write_text("diffusion:\n  train:\n    base_stepz: 3\n")
    result = CliRunner().invoke(app, ["diffusion", str(study)])
    assert result.exit_code == 2, result.output
    assert "diffusion.train.base_stepz" in result.output
    result = CliRunner().invoke(app, ["diffusion", str(study), "--quick"])
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(
        app, ["diffusion", "--quick", "--until", "nope", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "nope" in result.output
    good = tmp_path / "good.yaml"
    good.write_text("output:\n  dir: shared\ndiffusion:\n  preset: quick\n")
    result = CliRunner().invoke(app, ["diffusion", str(good), "--until", "data"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "shared" / "diffusion" / "data" / "test.npz").is_file()  # its own folder in output.dir


@pytest.mark.slow
def test_a_local_model_folder_is_the_base_model(tmp_path):
    """``diffusion.model: <folder>``: the base model and text encoder come from the folder (no training)."""
    from evidrift.data.reports import WordTokenizer
    from evidrift.studies.diffusion.config import parse_diffusion
    from evidrift.studies.diffusion.models import (
        build_schedulers,
        build_text_encoder,
        build_unet,
        load_model_folder,
        save_model_folder,
    )

    torch.set_num_threads(1)
    config = parse_diffusion({"preset": "quick", "model": str(tmp_path / "sd")})
    torch.manual_seed(3)
    unet = build_unet(config)
    text = build_text_encoder(config, WordTokenizer(max_length=config.text.max_length))
    save_model_folder(tmp_path / "sd", unet, text, build_schedulers(config)[0])
    messages: list[str] = []
    run_study(config, tmp_path / "run", until="base", log=messages.append)
    assert _ran(messages) == ["data", "text_encoder", "base"]
    loaded_unet, loaded_text, _ = load_model_folder(tmp_path / "run" / "models" / "base")
    for a, b in zip(unet.state_dict().values(), loaded_unet.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(text.state_dict().values(), loaded_text.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert not (tmp_path / "run" / "models" / "losses.json").exists()  # nothing was trained
