"""Shared test fixtures (small and generic). ``import evidrift`` first: it makes torchvision importable.

Plain builder functions (synthetic run directories, checkpoints, DICOM files) live in ``builders.py``;
this file puts ``tests/`` on ``sys.path`` so test files import them as ``from builders import ...``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import evidrift  # noqa: F401  (before timm/torchvision)

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """The whole session runs with one torch intra-op thread (module- and session-scoped fixtures too, which
    is why it is session-scoped): the models are tiny, and on a small machine shared with other processes
    more threads oversubscribe the cores and slow tiny convolutions down many times over. A test that sets
    its own thread count restores it; the count is restored at the end of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-image phantom set at 64 px (seed 0), generated once per session; returns its manifest.csv.
    Read-only: copy it before changing anything."""
    from evidrift.data.phantom import generate_phantom_set

    return generate_phantom_set(
        tmp_path_factory.mktemp("phantoms"), n=20, size=64, seed=0, progress=False, workers=1
    )
