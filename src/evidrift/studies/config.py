"""study.yaml: ``StudyConfig`` composes the sections of the classifier studies (data, models, train, explain,
drift, stats, report, output, probe, sanity), each defined by its owner.

``load_config(path)`` reads and validates a study file; a validation error is raised as ``ConfigError``
whose message names each wrong key by its dotted path, the value given and what is allowed. Unknown keys are
errors too (a typo must not be silently ignored). ``resolved_dict(config)`` is the canonical form written to
``run/config.yaml`` and hashed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, field_validator

from evidrift.classifier.config import ModelConfig, StatsConfig, TrainConfig
from evidrift.core.config import ConfigError, Section, validate_model
from evidrift.core.io import config_hash
from evidrift.data.config import DataConfig
from evidrift.studies.drift.config import DriftConfig, ExplainConfig, ReportConfig
from evidrift.studies.probe.config import ProbeConfig
from evidrift.studies.sanity.config import SanityConfig


class OutputConfig(Section):
    dir: Path = Path("runs/study")


class StudyConfig(Section):
    """A whole study (study.yaml)."""

    seed: int = 0
    data: DataConfig = DataConfig()
    models: Annotated[list[ModelConfig], Field(min_length=1)] = [
        ModelConfig(arch="densenet201"),
        ModelConfig(arch="resnet50v2"),
        ModelConfig(arch="inceptionv3"),
    ]
    train: TrainConfig = TrainConfig()
    explain: ExplainConfig = ExplainConfig()
    drift: DriftConfig = DriftConfig()
    stats: StatsConfig = StatsConfig()
    report: ReportConfig = ReportConfig()
    output: OutputConfig = OutputConfig()
    probe: ProbeConfig = ProbeConfig()
    sanity: SanityConfig = SanityConfig()

    @field_validator("models")
    @classmethod
    def _unique_model_keys(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        keys = [m.key for m in models]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"models listed twice: {duplicated}; give each a distinct `name`")
        return models


def parse_config(raw: dict[str, Any] | None, source: str = "<dict>") -> StudyConfig:
    """Validate a mapping; raises ``ConfigError`` listing every wrong key of ``source``."""
    return validate_model(StudyConfig, raw, source, "study file")


def load_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study YAML file. Relative ``data.path`` and ``output.dir`` are resolved against
    the file's folder. Raises ``ConfigError`` naming the file (missing, not YAML, or invalid keys)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"study file {file} does not exist; see examples/study.yaml for a template")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"{file} must hold a mapping of sections (data, models, train, ...), got {type(raw).__name__}"
        )
    if raw is not None:
        raw.pop("config_hash", None)  # written by dump_yaml into run/config.yaml; derived, not a setting
    config = parse_config(raw, str(file))
    base = file.resolve().parent
    if config.data.path is not None and not config.data.path.is_absolute():
        config.data.path = (base / config.data.path).resolve()
    if not config.output.dir.is_absolute():
        config.output.dir = (base / config.output.dir).resolve()
    return config


def resolved_dict(config: StudyConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (defaults filled in), the form written to run/config.yaml."""
    return config.model_dump(mode="json")


def study_hash(config: StudyConfig) -> str:
    """Hash of the resolved config without ``output`` (moving a run directory keeps its hash)."""
    resolved = resolved_dict(config)
    resolved.pop("output", None)
    return config_hash(resolved)


def dump_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML text, with its hash as the first key."""
    return yaml.safe_dump({"config_hash": study_hash(config), **resolved_dict(config)}, sort_keys=False)
