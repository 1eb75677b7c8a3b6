"""Shared test fixtures (small and generic). ``import evidrift`` first: it makes torchvision importable."""

from __future__ import annotations

from pathlib import Path

import pytest

import evidrift  # noqa: F401  (before timm/torchvision)


@pytest.fixture(scope="session")
def tiny_phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-image phantom set at 64 px (seed 0), generated once per session; returns its manifest.csv.
    Read-only: copy it before changing anything."""
    from evidrift.data.phantom import generate_phantom_set

    return generate_phantom_set(
        tmp_path_factory.mktemp("phantoms"), n=20, size=64, seed=0, progress=False, workers=1
    )
