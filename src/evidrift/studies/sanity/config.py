"""The ``sanity:`` section: the explanation sanity checks (parameter randomization, metric self-test)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from evidrift.core.config import Section
from evidrift.studies.drift.config import DEFAULT_EXPLAIN_METHODS


class SanityConfig(Section):
    """Parameter-randomization sanity checks: ``mode`` ``cascading`` (from the head down, block by block),
    ``independent`` (one block at a time) or ``both``; ``n_images`` test images explained with ``methods``;
    HOG features with ``hog_cell`` × ``hog_cell``-pixel cells."""

    methods: Annotated[list[str], Field(min_length=1)] = DEFAULT_EXPLAIN_METHODS
    mode: Literal["cascading", "independent", "both"] = "both"
    n_images: Annotated[int, Field(ge=2)] = 16
    hog_cell: Annotated[int, Field(ge=4)] = 16
    seed: int = 0
