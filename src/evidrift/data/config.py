"""The ``data:`` section of a study file: where the images come from (phantom set, class folders, CSV),
the splits, resizing, augmentation and what to do with unreadable images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import Field, model_validator

from evidrift.core.config import Section


class PhantomConfig(Section):
    """The embedded procedural chest X-ray set (ARCHITECTURE §9)."""

    n: Annotated[int, Field(ge=10, description="number of images (balanced over the five classes)")] = 500
    size: Annotated[int, Field(ge=32, le=2048, description="image side in pixels")] = 256
    seed: int = 0
    shortcut_marker: Annotated[
        float, Field(ge=0.0, le=1.0, description="probability that an image carries its class's text marker")
    ] = 0.0
    n_source: Annotated[int, Field(ge=0, description="images of the stage-0 `source` set")] = 800


class SplitConfig(Section):
    """Seeded stratified split fractions (grouped by patient_id when present); train gets the rest."""

    val: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.15
    test: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} must be < 1 so that train is not empty")
        return self


class DataConfig(Section):
    """Where images come from. ``source``: ``phantom`` (generated into the run), ``folder`` (one sub-folder
    per class under ``path``) or ``csv`` (a manifest with columns ``path,label`` and optional ``split``,
    ``patient_id``, ``mask``, ``x0,y0,x1,y1``; paths relative to the CSV)."""

    source: Literal["phantom", "folder", "csv"] = "phantom"
    path: Path | None = None
    classes: list[str] | None = None
    phantom: PhantomConfig = PhantomConfig()
    split: SplitConfig = SplitConfig()
    on_bad_image: Literal["error", "skip"] = "error"
    resize: Literal["pad", "crop"] = "pad"
    augment: bool = True

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataConfig:
        if self.source != "phantom" and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class DataStudy(Protocol):
    """What the data step reads of a study: its ``data`` section (``studies.config.StudyConfig`` is one)."""

    @property
    def data(self) -> DataConfig: ...
