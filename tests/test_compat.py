"""The torchvision compat module: `import evidrift` then timm/torchvision works on this machine, and the
workaround only applies when torchvision's own op library cannot load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from evidrift.core import compat as _compat

_PROBE = textwrap.dedent(
    """
    import json

    import evidrift
    import timm
    import torchvision
    import torch
    from evidrift.core import compat as _compat

    extension = _compat.torchvision_extension_path()
    try:
        torch.ops.load_library(str(extension))
        loads = True
    except (OSError, RuntimeError):
        loads = False
    print(json.dumps({"loads": loads, "defined": _compat.DEFINED_OPS, "timm": timm.__version__}))
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch, timm, torchvision
def test_import_evidrift_then_timm_and_torchvision_in_a_fresh_process() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # the schemas are defined exactly when torchvision's own _C library fails to load here
    assert out["defined"] == ([] if out["loads"] else ["nms", "qnms"])


def test_install_does_nothing_when_the_extension_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(_compat, "torchvision_ops_loadable", lambda extension: True)
    monkeypatch.setattr(_compat, "torchvision_extension_path", lambda: __import__("pathlib").Path("/x/_C.so"))
    called = []
    monkeypatch.setattr(_compat, "define_missing_torchvision_schemas", lambda: called.append(1) or ["nms"])
    assert _compat.install() == []
    assert called == []


def test_install_does_nothing_when_torchvision_is_already_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", sys.modules.get("torchvision", object()))
    monkeypatch.setattr(_compat, "torchvision_ops_loadable", lambda extension: False)
    called = []
    monkeypatch.setattr(_compat, "define_missing_torchvision_schemas", lambda: called.append(1) or ["nms"])
    assert _compat.install() == []
    assert called == []


def test_install_defines_schemas_when_the_extension_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delenv("EVIDRIFT_NO_TORCHVISION_COMPAT", raising=False)
    monkeypatch.setattr(_compat, "torchvision_extension_path", lambda: __import__("pathlib").Path("/x/_C.so"))
    monkeypatch.setattr(_compat, "torchvision_ops_loadable", lambda extension: False)
    monkeypatch.setattr(_compat, "define_missing_torchvision_schemas", lambda: ["nms", "qnms"])
    assert _compat.install() == ["nms", "qnms"]
    monkeypatch.setenv("EVIDRIFT_NO_TORCHVISION_COMPAT", "1")
    assert _compat.install() == []


def test_schemas_are_defined_in_the_dispatcher_after_import() -> None:
    import torchvision  # noqa: F401  (importable: that is the point)

    assert _compat.op_defined("nms") and _compat.op_defined("qnms")
