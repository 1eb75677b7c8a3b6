"""The layering rule of docs/ARCHITECTURE.md, checked on the source: a module imports only its own layer and
the layers below it. Every ``import``/``from ... import`` of an evidrift module counts, also the ones inside
functions and under ``TYPE_CHECKING``: a type hint pointing upwards is still a dependency upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "evidrift"

#: Bottom up. A module may import a module of a layer with a rank ≤ its own.
LAYERS: dict[str, int] = {
    "core": 0,
    "data": 1,
    "cam": 2,
    "metrics": 2,
    "stats": 3,
    "reversals": 3,
    "classifier": 4,
    "report": 5,
    "studies": 6,
    "cli": 7,
}


def layer_of(module: str) -> str | None:
    """``evidrift.core.io`` → ``core``; ``evidrift`` itself (the package init) → None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and not parts[1].startswith("__") else None


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def evidrift_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each evidrift import in ``path``; ``from evidrift import x`` counts as evidrift.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "evidrift":
                found += [(node.lineno, f"evidrift.{a.name}") for a in node.names]
            elif node.module.startswith("evidrift."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("evidrift.")]
    return found


def test_every_source_package_has_a_layer() -> None:
    tops = {p.name.removesuffix(".py") for p in SRC.iterdir() if not p.name.startswith("__")}
    tops -= {"templates", "py"}
    tops = {t for t in tops if (SRC / t).is_dir() or (SRC / f"{t}.py").is_file()}
    assert tops <= set(LAYERS), f"modules without a layer in LAYERS: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    own = layer_of(module_name(path))
    if own is None or own == "__main__":
        return  # the package init and ``python -m evidrift`` sit above every layer
    wrong = [
        f"line {line}: {mod} ({layer_of(mod)})"
        for line, mod in evidrift_imports(path)
        if layer_of(mod) is not None and LAYERS[layer_of(mod)] > LAYERS[own]  # type: ignore[index]
    ]
    assert not wrong, f"{path.relative_to(SRC)} (layer {own}) imports upwards: {wrong}"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from evidrift.studies.drift import study\nfrom evidrift.core import io\n")
    imports = evidrift_imports(bad)
    assert imports == [(1, "evidrift.studies.drift"), (2, "evidrift.core")]
    assert [m for _, m in imports if LAYERS[layer_of(m)] > LAYERS["classifier"]] == ["evidrift.studies.drift"]  # type: ignore[index]
