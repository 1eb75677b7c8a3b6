"""Make ``import torchvision`` (so ``import timm``) work with a torchvision wheel whose C++ ops cannot load.

The torchvision 0.28.0 wheel installed next to the CPU build of torch 2.13.0 is a CUDA build: its ``_C``
extension fails to load, and torchvision's ``_meta_registrations`` then dies on import with
"operator torchvision::nms does not exist", because it registers fake kernels for ops that were never
defined. When (and only when) loading torchvision's own ``_C`` library fails, this module defines the two
op *schemas* that ``_meta_registrations`` needs at import time (``nms`` and ``qnms``). No kernel is
registered, so calling ``torchvision.ops.nms`` still fails loudly; evidrift never calls it.

On a normal CPU or CUDA install the library loads, torchvision registers its own ops, and this module
does nothing. It must be imported before timm or torchvision (``evidrift/__init__.py`` does so).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

#: Op schemas torchvision registers fake kernels for at import time (see torchvision/_meta_registrations.py).
TORCHVISION_OP_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_fallback_library: torch.library.Library | None = None


def torchvision_extension_path() -> Path | None:
    """Path of torchvision's ``_C`` extension without importing torchvision; None when not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C*")):
            if candidate.suffix in {".so", ".pyd", ".dylib"}:
                return candidate
    return None


def torchvision_ops_loadable(extension: Path | None) -> bool:
    """True when torchvision's own op library loads (then nothing needs defining)."""
    if extension is None:
        return False
    try:
        torch.ops.load_library(str(extension))
    except (OSError, RuntimeError):
        return False
    return True


def op_defined(name: str) -> bool:
    """True when ``torchvision::{name}`` has a schema in the dispatcher."""
    return torch._C._dispatch_has_kernel(f"torchvision::{name}") or any(
        schema.name == f"torchvision::{name}" for schema in torch._C._jit_get_all_schemas()
    )


def define_missing_torchvision_schemas() -> list[str]:
    """Define the schemas of ``TORCHVISION_OP_SCHEMAS`` that are missing; returns the names defined."""
    global _fallback_library
    missing = [name for name in TORCHVISION_OP_SCHEMAS if not op_defined(name)]
    if not missing:
        return []
    if _fallback_library is None:
        _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _fallback_library.define(TORCHVISION_OP_SCHEMAS[name])
    return missing


def install() -> list[str]:
    """Apply the workaround if needed; returns the op names it defined ([] on a healthy install).

    Does nothing when torchvision is already imported, not installed, or its extension loads, or when
    ``EVIDRIFT_NO_TORCHVISION_COMPAT=1``.
    """
    if os.environ.get("EVIDRIFT_NO_TORCHVISION_COMPAT") == "1" or "torchvision" in sys.modules:
        return []
    extension = torchvision_extension_path()
    if extension is None or torchvision_ops_loadable(extension):
        return []
    return define_missing_torchvision_schemas()


DEFINED_OPS: list[str] = install()
