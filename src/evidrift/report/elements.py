"""The building blocks of the HTML report: the value types the template renders (sections, tables, cells,
figures), number formatting, CSV reading and the figure writer shared by every section."""

from __future__ import annotations

import base64
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evidrift.core.paths import safe_name
from evidrift.report import figures as F

_LOW_NAMES = ("ci_low", "ci_lo", "lo", "low", "ci_lower")
_HIGH_NAMES = ("ci_high", "ci_hi", "hi", "high", "ci_upper")


# --- small value types for the template ---------------------------------------------------------------------
@dataclass
class Cell:
    """One table cell: ``text`` (escaped by the template) and an optional CSS class."""

    text: str
    cls: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    numeric_from: int = 1


@dataclass
class FigureRef:
    """A figure written to ``figures/{name}.png`` and embedded as base64."""

    name: str
    title: str
    b64: str
    caption: str = ""


@dataclass
class Section:
    id: str
    title: str
    nav: str = ""
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureRef] = field(default_factory=list)
    groups: list[tuple[str, list[FigureRef]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    details: list[tuple[str, Table]] = field(default_factory=list)


# --- helpers ------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals ("n/a" when not finite, never "-0.000"); other values as str."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "n/a"
    text = f"{number:.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.000"


def fmt_p(value: Any) -> str:
    """A p-value: three decimals from 0.001 up, else scientific with two digits (never "0.000")."""
    if isinstance(value, numbers.Real) and 0.0 <= float(value) < 1e-3:
        return f"{float(value):.1e}"
    return fmt(value, 3)


def fmt_ci(mean: Any, low: Any, high: Any, digits: int = 3) -> str:
    """``mean [low, high]``, or the mean alone when a bound is missing."""
    text = fmt(mean, digits)
    if text == "n/a":
        return text
    if fmt(low) == "n/a" or fmt(high) == "n/a":
        return text
    return f"{text} [{fmt(low, digits)}, {fmt(high, digits)}]"


def ci_columns(frame: pd.DataFrame) -> tuple[str, str]:
    """Names of the lower/upper CI columns of a summary table (the stats module's spelling)."""
    low = next((c for c in _LOW_NAMES if c in frame.columns), None)
    high = next((c for c in _HIGH_NAMES if c in frame.columns), None)
    if low is None or high is None:
        raise ValueError(
            f"summary table has no CI columns (looked for {_LOW_NAMES} / {_HIGH_NAMES}): "
            f"{list(frame.columns)}"
        )
    return low, high


def read_csv_or_none(path: Path) -> pd.DataFrame | None:
    """The CSV at ``path`` (an empty frame for an empty file), or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def ordered(values: Iterable[Any], preferred: Sequence[str] | None = None) -> list[str]:
    """Unique strings of ``values``, ``preferred``'s order first, then first-seen order."""
    seen = list(dict.fromkeys(str(v) for v in values))
    if not preferred:
        return seen
    first = [p for p in preferred if p in seen]
    return first + [v for v in seen if v not in first]


class FigureWriter:
    """Draws figures to ``figures/{name}.png`` and keeps the base64 for embedding."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, fig: Any, name: str, title: str, caption: str = "") -> FigureRef:
        file_name = safe_name(name).replace("+", "p").replace("@", "at").replace("=", "-")
        data = F.render_png(fig, self.folder / f"{file_name}.png")
        return FigureRef(file_name, title, base64.b64encode(data).decode("ascii"), caption)
