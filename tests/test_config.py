"""study.yaml validation: the examples are valid; wrong keys and values are named with what is allowed;
`evidrift validate` exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evidrift.cli.app import app
from evidrift.core.config import ConfigError
from evidrift.studies.config import load_config, parse_config, study_hash

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_example_studies() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"study.yaml", "study_folder.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(example: Path) -> None:
    config = load_config(example)
    assert config.output.dir.is_absolute()
    if config.data.path is not None:
        assert config.data.path.is_absolute()


def test_phantom_example_uses_the_embedded_set() -> None:
    config = load_config(EXAMPLES[[p.name for p in EXAMPLES].index("study.yaml")])
    assert config.data.source == "phantom" and config.data.phantom.n >= 100


def test_typo_key_names_the_dotted_key_and_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"data": {"phantom": {"shortcut_maker": 0.5}}}, "s.yaml")
    message = str(info.value)
    assert message.startswith("s.yaml is not a valid study file:")
    assert "data.phantom.shortcut_maker: unknown key; did you mean 'shortcut_marker'?" in message
    assert "(allowed: n, size, seed, shortcut_marker, n_source" in message


def test_bad_enum_names_the_dotted_key_and_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"data": {"resize": "stretch", "on_bad_image": "ignore"}}, "s.yaml")
    message = str(info.value)
    assert "data.resize:" in message and "(allowed: 'pad' or 'crop'); got 'stretch'" in message
    assert "data.on_bad_image:" in message and "'error' or 'skip'" in message and "got 'ignore'" in message


def test_data_path_is_required_for_folder_and_csv() -> None:
    with pytest.raises(ConfigError, match=r"data\.path is required when data\.source is 'csv'"):
        parse_config({"data": {"source": "csv"}})


def test_split_fractions_must_leave_train() -> None:
    with pytest.raises(ConfigError, match=r"data\.split.*val \+ test = 1 must be < 1"):
        parse_config({"data": {"split": {"val": 0.5, "test": 0.5}}})


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"stage2": {"cache_features": True}}, r"train\.stage2\.cache_features applies to stage 1 only"),
        (
            {"stage0": {"standardize_features": True}},
            r"train\.stage0\.standardize_features applies to stage 1",
        ),
        ({"stage1": {"freeze_batchnorm": True}}, r"train\.stage1\.freeze_batchnorm applies to stage 2 only"),
        ({"stage2": {"feature_scale": "shared"}}, r"train\.stage2\.feature_scale applies to stage 1 only"),
        ({"stage1": {"augment": True}}, r"train\.stage1\.augment: true has no effect.*cache_features: false"),
        ({"stage0": {"image_size": 64, "image_scale": 0.5}}, r"image_size \(64\) and image_scale \(0\.5\)"),
    ],
)
def test_stage_options_in_the_wrong_place_are_errors(train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"train": train}, "s.yaml")


def test_stage_options_in_their_place_are_accepted() -> None:
    config = parse_config(
        {
            "train": {
                "stage0": {"image_scale": 0.5},
                "stage1": {"standardize_features": False, "cache_features": False, "augment": True},
                "stage2": {"freeze_batchnorm": True, "augment": False},
            }
        }
    )
    assert config.train.stage1.augment and config.train.stage2.augment is False
    assert config.train.stage0.image_scale == 0.5
    assert config.train.stage1.standardize_features is False
    assert config.train.stage2.freeze_batchnorm


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    study = tmp_path / "sub" / "s.yaml"
    study.write_text(
        yaml.safe_dump({"data": {"source": "csv", "path": "data/m.csv"}, "output": {"dir": "out"}})
    )
    config = load_config(study)
    assert config.data.path == tmp_path / "sub" / "data" / "m.csv"
    assert config.output.dir == tmp_path / "sub" / "out"
    # moving the output folder does not change the hash
    other = parse_config({"data": {"source": "csv", "path": str(config.data.path)}, "output": {"dir": "/x"}})
    assert study_hash(config) == study_hash(other)


def test_validate_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["validate", str(EXAMPLES[0])])
    assert good.exit_code == 0, good.output
    assert "config_hash:" in good.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: phantm\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    missing = runner.invoke(app, ["validate", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    assert runner.invoke(app, ["validate", str(not_a_mapping)]).exit_code == 2


def test_validate_cli_prints_the_error_on_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: phantm\n")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    text = result.stderr if hasattr(result, "stderr") else result.output
    assert "data.source" in text and "'phantom', 'folder' or 'csv'" in text and "phantm" in text


def test_phantoms_cli_writes_the_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["phantoms", str(tmp_path / "set"), "--n", "10", "--size", "40", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    for name in ("manifest.csv", "params.json", "preview.png"):
        assert (tmp_path / "set" / name).is_file()
    assert len(list((tmp_path / "set" / "images").rglob("*.png"))) == 10


def test_a_run_directory_config_yaml_loads_back(tmp_path) -> None:
    from evidrift.studies.config import dump_yaml, load_config, parse_config, study_hash

    config = parse_config({"seed": 3})
    (tmp_path / "config.yaml").write_text(dump_yaml(config))
    assert study_hash(load_config(tmp_path / "config.yaml")) == study_hash(config)
