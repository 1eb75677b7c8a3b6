"""How methods are named in the report: one name per map set, per layer and per equivalence class.

The drift tables keep the method and the layer apart (``method``, ``layer``); the report's sections are
keyed by one method name per architecture. With one CAM layer in the study that name is the method; with
several it is ``method@layer`` (the maps-store name, e.g. ``gradcam@spatial``). Methods that coincide at a
layer (``evidrift.reversals``) are shown as one row named by their class, ``gradcam ≡ xgradcam``.
"""

from __future__ import annotations

import pandas as pd

from evidrift.reversals import representative_rows
from evidrift.stats import keyed_by_map_set


def layers_of(table: pd.DataFrame | None) -> list[str]:
    """The layers named in a table with a ``layer`` column (``[""]`` without one), in first-seen order."""
    if table is None or table.empty or "layer" not in table.columns:
        return [""]
    return list(dict.fromkeys(table["layer"].fillna("").astype(str)))


def label(method: str, layer: str, several_layers: bool) -> str:
    """``method`` or, when the study has several layers, ``method@layer`` (``(a ≡ b)@layer`` for a class)."""
    if not (several_layers and layer):
        return method
    return f"({method})@{layer}" if " ≡ " in method else f"{method}@{layer}"


def drift_for_display(drift: pd.DataFrame) -> pd.DataFrame:
    """The drift table with ``method`` = the map set's name (the maps-store name the map sections read)."""
    return keyed_by_map_set(drift)


def summary_for_display(summary: pd.DataFrame, several_layers: bool) -> pd.DataFrame:
    """summary.csv with one row per equivalence class (its representative's figures), ``method`` = the
    class label (``gradcam ≡ xgradcam``, with ``@layer`` when the study has several layers)."""
    if summary.empty or "equivalence_class" not in summary.columns:
        return summary
    shown = representative_rows(summary).copy()
    layers = shown["layer"].fillna("").astype(str) if "layer" in shown.columns else pd.Series("", shown.index)
    shown["method"] = [
        label(c, layer, several_layers) for c, layer in zip(shown["equivalence_class"], layers, strict=True)
    ]
    return shown


def methods_for_display(table: pd.DataFrame, columns: tuple[str, ...], several_layers: bool) -> pd.DataFrame:
    """``table`` (rankings, reversals) with each of ``columns`` renamed to ``label(method, layer)``."""
    if table.empty or "layer" not in table.columns or not several_layers:
        return table
    layers = table["layer"].fillna("").astype(str)
    return table.assign(
        **{
            c: [label(m, la, True) for m, la in zip(table[c].astype(str), layers, strict=True)]
            for c in columns
        }
    )
