"""Where images come from: phantom set, class folders or CSV manifest → one checked manifest (ARCHITECTURE
§3).

``prepare_data(config, paths)`` turns ``config.data`` into ``run/data/manifest.parquet`` (written atomically)
and ``run/data/classes.json`` (the class names in label-index order, a JSON list). Manifest columns:

========== =================================================================================================
id         str, unique: the file stem, or the path relative to the data root (without suffix) when stems
           collide
path       str, absolute path of the image
label      str, one of the classes;  label_idx: int64, its index in ``classes``
split      "train" | "val" | "test" (given by the CSV's ``split`` column, else seeded stratified split,
           grouped by ``patient_id`` when present: no patient is in two splits)
patient_id str or None
mask_path  str (absolute) or None: the lesion mask, same size as the image
bbox       str, a JSON list of boxes [[x0, y0, x1, y1], ...] in pixels, or None
status     "ok" or "skipped: <reason>" (unreadable image with ``on_bad_image: skip``)
========== =================================================================================================

Extra columns of a CSV manifest (e.g. the phantom set's ``marker``) are kept after these.

Class folders hold images by suffix (``IMAGE_SUFFIXES``) or DICOM by content (the ``DICM`` preamble, so
extensionless PACS exports count); every other file (hidden ones and files outside the class folders
included) is ignored, counted and listed: logged by the data step and written to ``run/data/ignored.json``
(a JSON list of paths relative to ``data.path``) for the report.

``data_fingerprint(config.data)`` is what the data step read: for a CSV one entry per row (its cells and
the size and modification time of its image and mask) plus the CSV's bytes; for class folders every file
under ``data.path`` with its size and modification time; nothing for the phantom set (generated from the
config). It is part of the data step's hash and written to ``run/data/fingerprint.json``, so a rerun notices
added, removed and modified files (``fingerprint_changes``). ``load_manifest`` checks that every image it
lists still exists.

Checks run before any training; each failure raises ``ManifestError`` naming the file or the CSV row and the
fix: missing file, unknown label (vs ``data.classes``), empty class, duplicate path, invalid split value,
patient in two splits, bad box, mask missing / unreadable / of the wrong size. Unreadable or corrupt images
raise (``on_bad_image: error``) or are kept with status ``skipped: <reason>``, logged and counted (``skip``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from evidrift.core.errors import EvidriftError
from evidrift.core.io import write_json_atomic, write_parquet_atomic
from evidrift.core.paths import RunPaths
from evidrift.data.phantom import CLASSES as PHANTOM_CLASSES
from evidrift.data.phantom import generate_phantom_set, generated_set_matches, phantom_params
from evidrift.data.readers import IMAGE_SUFFIXES, ImageReadError, is_dicom, read_image, read_mask
from evidrift.data.source_task import SOURCE_CLASSES, generate_source_set, source_params

if TYPE_CHECKING:
    from evidrift.data.config import DataStudy

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "id",
    "path",
    "label",
    "label_idx",
    "split",
    "patient_id",
    "mask_path",
    "bbox",
    "status",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}  # fmt: skip
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_CSV_KNOWN = {"path", "label", "split", "patient_id", "mask", *_BOX_COLUMNS}
_MAX_LISTED = 8
#: Images whose resize to the model's input side scales them up by more than this are warned about.
UPSCALE_WARNING = 4.0
FINGERPRINT_FILE = "fingerprint.json"
IGNORED_FILE = "ignored.json"


class ManifestError(EvidriftError, ValueError):
    """A data source that cannot be used; the message names the file or row and how to fix it."""


@dataclass
class PreparedData:
    """What the data step builds: the manifest, the classes, the files of class folders it ignored (paths
    relative to ``data.path``) and the warnings it logged."""

    frame: pd.DataFrame
    classes: list[str]
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --- public entry points ------------------------------------------------------------------------------------
def prepare_data(config: DataStudy, paths: RunPaths, input_size: int | None = None) -> pd.DataFrame:
    """Build, check and write the target manifest of ``config.data``; returns it (all rows, skipped included).

    ``phantom``: generates the set into ``run/data/phantoms`` (reused when present with the same parameters)
    and reads its manifest.csv. ``folder``: one sub-folder per class under ``data.path``. ``csv``: the
    manifest at ``data.path``. Writes ``run/data/manifest.parquet``, ``classes.json``, ``ignored.json`` and
    ``fingerprint.json``. ``input_size``: the largest model input side, for the small-image warning.
    """
    fingerprint = data_fingerprint(config.data)
    prepared = collect_data(config, paths.data_dir / "phantoms", input_size)
    _write(paths.data_dir, prepared.frame, prepared.classes)
    write_json_atomic(paths.data_dir / IGNORED_FILE, prepared.ignored)
    write_json_atomic(paths.data_dir / FINGERPRINT_FILE, fingerprint)
    return prepared.frame


def collect_data(config: DataStudy, phantom_dir: Path | None, input_size: int | None = None) -> PreparedData:
    """The data step without writing its outputs: read ``config.data``, run every check, log the ignored
    files and the warnings (16-bit images using at most 12 bits, images upscaled more than
    ``UPSCALE_WARNING`` times to ``input_size``). ``phantom_dir``: where the phantom set is generated (None:
    the phantom source is not read, ManifestError). Raises ``ManifestError``."""
    data = config.data
    ignored: list[str] = []
    if data.source == "phantom":
        if phantom_dir is None:
            raise ManifestError("the phantom set is generated by the data step; nothing to read before it")
        phantom = data.phantom
        out = phantom_dir
        params = phantom_params(phantom.n, phantom.size, phantom.seed, phantom.shortcut_marker)
        if generated_set_matches(out, params):
            logger.info("reusing the phantom set in %s", out)
        else:
            generate_phantom_set(out, phantom.n, phantom.size, phantom.seed, phantom.shortcut_marker)
        raw, origin = read_csv_manifest(out / "manifest.csv")
        classes = list(data.classes) if data.classes else list(PHANTOM_CLASSES)
        root = out
    elif data.source == "folder":
        assert data.path is not None  # enforced by DataConfig
        raw = scan_class_folders(data.path, data.classes, ignored)
        origin, root = str(data.path), Path(data.path)
        classes = list(data.classes) if data.classes else sorted(raw["label"].unique().tolist())
        if ignored:
            shown = ", ".join(ignored[:_MAX_LISTED]) + (" ..." if len(ignored) > _MAX_LISTED else "")
            logger.warning(
                "%s: %d files ignored (neither images by suffix %s nor DICOM by content): %s",
                origin, len(ignored), "/".join(sorted(IMAGE_SUFFIXES)), shown,
            )  # fmt: skip
    else:
        assert data.path is not None
        raw, origin = read_csv_manifest(data.path)
        root = Path(data.path).parent
        classes = list(data.classes) if data.classes else sorted(raw["label"].dropna().unique().tolist())
    notes: list[str] = []
    frame = build_manifest(
        raw,
        root=root,
        classes=classes,
        origin=origin,
        val=data.split.val,
        test=data.split.test,
        seed=data.split.seed,
        on_bad_image=data.on_bad_image,
        input_size=input_size,
        resize=data.resize,
        notes=notes,
    )
    return PreparedData(frame, classes, ignored, notes)


def prepare_source_data(config: DataStudy, paths: RunPaths) -> pd.DataFrame:
    """Generate (or reuse) the stage-0 source set under ``run/data/source`` (``data.phantom.n_source`` images
    of ``SOURCE_CLASSES`` at ``data.phantom.size``), split it into train and val (``data.split.val``, else
    0.15; no test split: nothing evaluates stage 0 on held-out images) and write its manifest
    (``run/data/source/manifest.parquet`` + ``classes.json``, same columns). Returns the manifest."""
    phantom = config.data.phantom
    if phantom.n_source < len(SOURCE_CLASSES):
        raise ManifestError(
            f"data.phantom.n_source = {phantom.n_source} is too small for stage-0 pretraining; "
            "set it to at least "
            f"{len(SOURCE_CLASSES)} (one image per source class), e.g. 800"
        )
    out = paths.data_dir / "source"
    params = source_params(phantom.n_source, phantom.size, phantom.seed)
    if generated_set_matches(out, params):
        logger.info("reusing the source set in %s", out)
    else:
        generate_source_set(out, phantom.n_source, phantom.size, phantom.seed)
    raw, origin = read_csv_manifest(out / "manifest.csv")
    classes = list(SOURCE_CLASSES)
    frame = build_manifest(
        raw,
        root=out,
        classes=classes,
        origin=origin,
        val=config.data.split.val if config.data.split.val > 0 else 0.15,
        test=0.0,  # stage 0 only trains and validates: every other image is a training image
        seed=config.data.split.seed,
        on_bad_image="error",
    )
    _write(out, frame, classes)
    return frame


def load_manifest(paths: RunPaths, source: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Read a written manifest and its classes: the target one, or the stage-0 one with ``source=True``.

    Raises ``ManifestError`` naming the missing file (run ``evidrift run`` / ``prepare_data`` first)."""
    folder = paths.data_dir / "source" if source else paths.data_dir
    manifest, classes_file = folder / "manifest.parquet", folder / "classes.json"
    for file in (manifest, classes_file):
        if not file.is_file():
            raise ManifestError(f"{file} does not exist; prepare the data first (evidrift run study.yaml)")
    frame = pd.read_parquet(manifest)
    classes = json.loads(classes_file.read_text(encoding="utf-8"))
    check_files_exist(frame, manifest)
    return frame, list(classes)


def check_files_exist(frame: pd.DataFrame, manifest: Path) -> None:
    """Raise ``ManifestError`` listing the usable images (and masks) of ``frame`` that no longer exist: the
    data changed after the data step wrote ``manifest``."""
    ok = frame[frame["status"] == "ok"]
    files = list(ok["path"])
    if "mask_path" in ok.columns:
        files += [m for m in ok["mask_path"] if isinstance(m, str) and m]
    gone = [f for f in files if not os.path.isfile(f)]
    _raise_if(
        gone,
        f"files listed in {manifest} by the data step no longer exist",
        "restore them, or rerun `evidrift run study.yaml`: the data step notices the change and rebuilds the "
        "manifest (`--force data` rebuilds it in any case)",
    )


# --- what the data step read --------------------------------------------------------------------------------
def _stat(path: str | os.PathLike[str]) -> str:
    """``size:mtime_ns`` of a file, or ``missing``."""
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    return f"{info.st_size}:{info.st_mtime_ns}"


def data_fingerprint(data: Any) -> dict[str, str]:
    """{entry: digest} of what the data step reads for ``data`` (a ``DataConfig``); see the module doc.

    ``csv``: ``csv`` → SHA-256 of the file, and per row ``row:{path cell}`` → a digest of its cells and of
    the size and mtime of its image and mask (paths as the data step resolves them). ``folder``: every file
    under ``data.path`` (relative path → ``size:mtime_ns``). A missing CSV or folder gives ``{"missing":
    path}`` (the data step then reports it)."""
    if data.source == "phantom" or data.path is None:
        return {}
    path = Path(data.path)
    if data.source == "folder":
        if not path.is_dir():
            return {"missing": str(path)}
        return {
            file.relative_to(path).as_posix(): _stat(file)
            for file in sorted(path.rglob("*"))
            if file.is_file()
        }
    if not path.is_file():
        return {"missing": str(path)}
    content = path.read_bytes()
    entries = {"csv": hashlib.sha256(content).hexdigest()[:16]}
    try:
        table, _ = read_csv_manifest(path)
    except ManifestError:
        return entries
    base = path.parent
    for row in table.drop(columns="where").to_dict("records"):
        cells = {
            column: value for column, value in row.items() if value != ""
        }  # a new empty column: same row
        key = f"row:{cells.get('path', '')}"
        files = [cells.get("path", ""), cells.get("mask", "")]
        stats = [_stat(_resolve(base, f)) if f else "" for f in files]
        digest = hashlib.sha256(json.dumps([cells, stats], sort_keys=True).encode()).hexdigest()[:16]
        while key in entries:  # a duplicated path (an error the data step reports): keep both rows
            key += "+"
        entries[key] = digest
    return entries


def fingerprint_digest(entries: dict[str, str]) -> str:
    """A short digest of a fingerprint (what the data step's hash includes)."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_changes(before: dict[str, str], after: dict[str, str]) -> str:
    """``n added, n removed, n modified`` between two fingerprints, with a few names of each; ``""`` when
    they are equal."""
    if before == after:
        return ""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    modified = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = []
    for what, names in (("added", added), ("removed", removed), ("modified", modified)):
        files = [n.removeprefix("row:") for n in names if n != "csv"]
        shown = files[:3]
        extra = f" ({', '.join(shown)}{', ...' if len(files) > len(shown) else ''})" if shown else ""
        parts.append(f"{len(files)} {what}{extra}")
    text = ", ".join(parts)
    if "csv" in modified and not (added or removed or len(modified) > 1):
        text += "; the CSV's bytes changed (formatting or column order)"
    return text


def read_fingerprint(paths: RunPaths) -> dict[str, str] | None:
    """The fingerprint the last data step of a run wrote, or None."""
    file = paths.data_dir / FINGERPRINT_FILE
    try:
        return dict(json.loads(file.read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- reading sources ----------------------------------------------------------------------------------------
def scan_class_folders(
    root: str | os.PathLike[str], classes: Sequence[str] | None = None, ignored: list[str] | None = None
) -> pd.DataFrame:
    """One row per image file under ``root/{class}/`` (recursively): a suffix in ``IMAGE_SUFFIXES``, or a
    DICOM file by content whatever its name.

    Columns path (relative to ``root``), label, where. With ``classes`` given, a sub-folder not in it is an
    unknown label and a class without a folder (or without images) is an empty class. ``ignored``: a list
    that receives every other file (relative paths, sorted): hidden files, files that are neither images nor
    DICOM, files directly under ``root``."""
    base = Path(root)
    if not base.is_dir():
        raise ManifestError(
            f"data.path {base} is not a folder; point it at a folder with one sub-folder per class"
        )
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ManifestError(
            f"{base} has no sub-folders; put the images of each class in {base}/<class name>/"
        )
    names = [p.name for p in folders]
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise ManifestError(
                f"{base}: sub-folder(s) {unknown} are not in data.classes {list(classes)}; "
                "add them to data.classes "
                "or move them out of the data folder"
            )
    rows = []
    skipped: list[str] = [p.name for p in sorted(base.iterdir()) if p.is_file()]
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if not file.is_file():
                continue
            relative = file.relative_to(base).as_posix()
            hidden = any(part.startswith(".") for part in file.relative_to(folder).parts)
            if not hidden and (file.suffix.lower() in IMAGE_SUFFIXES or is_dicom(file)):
                rows.append({"path": relative, "label": folder.name, "where": str(file)})
            else:
                skipped.append(relative)
    if ignored is not None:
        ignored.extend(sorted(skipped))
    wanted = list(classes) if classes is not None else names
    counts = {name: sum(r["label"] == name for r in rows) for name in wanted}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise ManifestError(
            f"{base}: class(es) {empty} have no images "
            f"(looked for {sorted(IMAGE_SUFFIXES)} and DICOM files in {base}/<class>/); "
            "add images or remove the class from data.classes / the empty folder"
        )
    return pd.DataFrame(rows, columns=["path", "label", "where"])


def read_csv_manifest(csv: str | os.PathLike[str]) -> tuple[pd.DataFrame, str]:
    """Read a CSV manifest (columns path, label; optional split, patient_id, mask, x0, y0, x1, y1).

    Returns (table with a ``where`` column "FILE line N", the file name). Raises ``ManifestError`` for a
    missing or unparsable file or missing columns."""
    file = Path(csv)
    if not file.is_file():
        raise ManifestError(f"CSV manifest {file} does not exist; set data.path to the CSV file")
    try:
        table = pd.read_csv(file, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(
            f"{file} cannot be parsed as CSV ({exc}); it needs a header line `path,label`"
        ) from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{file}: missing column(s) {missing} (found {list(table.columns)}); "
            "the header needs at least `path,label`"
        )
    table = table.map(lambda value: value.strip() if isinstance(value, str) else value)
    table["where"] = [f"{file} line {i + 2}" for i in range(len(table))]
    return table, str(file)


# --- building and checking ----------------------------------------------------------------------------------
def build_manifest(
    raw: pd.DataFrame,
    root: str | os.PathLike[str],
    classes: Sequence[str],
    origin: str,
    val: float,
    test: float,
    seed: int,
    on_bad_image: str = "error",
    decode_workers: int = 4,
    input_size: int | None = None,
    resize: str = "pad",
    notes: list[str] | None = None,
) -> pd.DataFrame:
    """Check ``raw`` rows (path/label[/split/patient_id/mask/x0..y1], paths relative to ``root``) and return
    the manifest (``MANIFEST_COLUMNS`` then extra columns). Raises ``ManifestError`` (see the module doc).

    Warnings (logged, and appended to ``notes`` when given): 16-bit images using at most 12 bits, and with
    ``input_size``, images that the ``resize`` to that side scales up more than ``UPSCALE_WARNING`` times."""
    base = Path(root)
    table = raw.copy().reset_index(drop=True)
    if "where" not in table.columns:
        table["where"] = [f"{origin} row {i + 1}" for i in range(len(table))]
    classes = list(classes)
    _check_rows(table, classes, origin)
    table["abs_path"] = [_resolve(base, p) for p in table["path"]]
    _check_files(table, origin)
    splits = _given_splits(table, origin)
    patients = _patient_ids(table)
    boxes = _boxes(table, origin)
    mask_paths = _mask_paths(table, base, origin)
    statuses, warnings = _check_images(
        table, mask_paths, boxes, origin, on_bad_image, decode_workers, input_size, resize
    )
    _log_warnings(warnings, statuses)
    if notes is not None:
        notes.extend(warnings)
    if splits is None:
        splits = assign_splits(table["label"].tolist(), patients, val=val, test=test, seed=seed)

    frame = pd.DataFrame(
        {
            "id": _ids(table, base),
            "path": table["abs_path"],
            "label": table["label"],
            "label_idx": np.array([classes.index(lab) for lab in table["label"]], dtype=np.int64),
            "split": list(splits),
            "patient_id": patients,
            "mask_path": mask_paths,
            "bbox": boxes,
            "status": statuses,
        }
    )
    extra = [c for c in table.columns if c not in _CSV_KNOWN and c not in {"where", "abs_path"}]
    for column in extra:
        if column not in frame.columns:
            frame[column] = _typed(table[column])
    return frame


def _check_rows(table: pd.DataFrame, classes: list[str], origin: str) -> None:
    """The classes and every row's path and label: ``ManifestError`` listing the rows that are wrong."""
    if not classes:
        raise ManifestError(f"{origin}: no classes found; list them in data.classes or add labelled images")
    if len(set(classes)) != len(classes):
        raise ManifestError(f"data.classes lists a class twice: {classes}")
    if table.empty:
        raise ManifestError(f"{origin}: no images listed")
    blank = [
        w for w, p, lab in zip(table["where"], table["path"], table["label"], strict=True) if not p or not lab
    ]
    _raise_if(blank, f"{origin}: empty path or label", "fill in both the path and the label of each row")
    unknown = [
        f"{w}: label {lab!r}"
        for w, lab in zip(table["where"], table["label"], strict=True)
        if lab not in classes
    ]
    _raise_if(
        unknown,
        f"{origin}: labels not in the classes {classes}",
        "correct the label or add it to data.classes",
    )
    counts = table["label"].value_counts()
    empty = [c for c in classes if counts.get(c, 0) == 0]
    if empty:
        raise ManifestError(
            f"{origin}: class(es) {empty} have no images; add images of them or remove them from data.classes"
        )


def _check_files(table: pd.DataFrame, origin: str) -> None:
    """Every resolved path (``abs_path``) listed once and existing: ``ManifestError`` listing the others."""
    duplicated = table["abs_path"].duplicated(keep=False)
    if duplicated.any():
        groups = table[duplicated].groupby("abs_path")["where"].apply(list)
        listed = [f"{path} in {', '.join(where)}" for path, where in groups.items()]
        _raise_if(listed, f"{origin}: the same image is listed more than once", "keep one row per image")
    missing = [
        f"{w}: {p}" for w, p in zip(table["where"], table["abs_path"], strict=True) if not Path(p).is_file()
    ]
    _raise_if(
        missing,
        f"{origin}: image files not found",
        "fix the path (relative to the CSV's folder) or remove the row",
    )


def _check_images(
    table: pd.DataFrame,
    mask_paths: list[str | None],
    boxes: list[str | None],
    origin: str,
    on_bad_image: str,
    decode_workers: int,
    input_size: int | None,
    resize: str,
) -> tuple[list[str], list[str]]:
    """Decode every image once, so that corrupt files and mask sizes are found before any training; returns
    (status per row: ``ok`` or ``skipped: reason``, warnings). Raises ``ManifestError`` for unreadable images
    (unless ``on_bad_image: skip``) and for masks or boxes that do not fit their images."""
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        decoded = pool.map(_try_shape, table["abs_path"])
        checked = list(
            tqdm(decoded, total=len(table), desc="checking images", unit="img", disable=len(table) < 500)
        )
    shapes = [shape for shape, _ in checked]
    warnings = [note for _, image_notes in checked for note in image_notes]
    bad = [
        (w, p, s)
        for w, p, s in zip(table["where"], table["abs_path"], shapes, strict=True)
        if isinstance(s, str)
    ]
    if bad and on_bad_image == "error":
        _raise_if(
            [f"{w}: {reason}" for w, _, reason in bad],
            f"{origin}: unreadable images",
            "replace or remove these files, or set data.on_bad_image: skip to leave them out",
        )
    statuses: list[str] = []
    problems: list[str] = []
    for where, path, shape, mask_path, box in zip(
        table["where"], table["abs_path"], shapes, mask_paths, boxes, strict=True
    ):
        if isinstance(shape, str):
            statuses.append(f"skipped: {shape}")
            if where == path:  # class folders: the location is the path itself
                logger.warning("skipping %s: %s", path, shape)
            else:
                logger.warning("skipping %s (%s): %s", path, where, shape)
            continue
        statuses.append("ok")
        if input_size is not None:
            factor = input_size / (max(shape) if resize == "pad" else min(shape))
            if factor > UPSCALE_WARNING:
                warnings.append(
                    f"{where}: {shape[1]}x{shape[0]} px image is upscaled {factor:.1f}x to the "
                    f"{input_size} px model input (more than {UPSCALE_WARNING:g}x: little detail left to "
                    "explain); use larger images or a smaller models[].image_size"
                )
        problems += _annotation_problems(where, shape, mask_path, box)
    _raise_if(problems, f"{origin}: masks or boxes do not fit their images", "see each line")
    return statuses, warnings


def _annotation_problems(
    where: str, shape: tuple[int, int], mask_path: str | None, box: str | None
) -> list[str]:
    """What is wrong with one image's mask (unreadable, another size) and boxes (outside the image)."""
    problems: list[str] = []
    if mask_path is not None:
        try:
            mask_shape = read_mask(mask_path).shape
        except ImageReadError as exc:
            return [f"{where}: mask {mask_path} cannot be read ({exc})"]
        if mask_shape != shape:
            problems.append(
                f"{where}: mask {mask_path} is {mask_shape[1]}x{mask_shape[0]} (WxH) but the image is "
                f"{shape[1]}x{shape[0]}; masks must have the image's size (re-export the mask)"
            )
    if box is not None:
        height, width = shape
        for x0, y0, x1, y1 in json.loads(box):
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                problems.append(
                    f"{where}: box [{x0}, {y0}, {x1}, {y1}] lies outside the {width}x{height} image; "
                    "boxes are pixel coordinates x0,y0,x1,y1 within the image"
                )
    return problems


def _log_warnings(warnings: list[str], statuses: list[str]) -> None:
    for line in warnings[:_MAX_LISTED]:
        logger.warning("%s", line)
    if len(warnings) > _MAX_LISTED:
        logger.warning("... and %d more warnings like these", len(warnings) - _MAX_LISTED)
    skipped = sum(s != "ok" for s in statuses)
    if skipped:
        logger.warning("%d of %d images skipped as unreadable (on_bad_image: skip)", skipped, len(statuses))


def assign_splits(
    labels: Sequence[str], groups: Sequence[str | None] | None, val: float, test: float, seed: int
) -> list[str]:
    """Seeded stratified split of rows into train/val/test, grouped: rows sharing a group (patient) get the
    same split. Rows whose group is None are their own group.

    Per class, the target counts of val and test are round(fraction × class size) (largest remainders so the
    three add up); groups are taken largest first (ties in a seeded random order) and each goes to the split
    whose per-class deficit, weighted by the group's label counts, is largest. Without groups this hits the
    targets exactly. Returns one split name per row."""
    labels = list(labels)
    n = len(labels)
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    group_keys = [
        (f"g:{g}" if g is not None else f"row:{i}")
        for i, g in enumerate(groups if groups is not None else [None] * n)
    ]
    class_names = sorted(set(labels))
    class_index = {c: k for k, c in enumerate(class_names)}
    fractions = np.array([1.0 - val - test, val, test])
    class_counts = np.bincount([class_index[lab] for lab in labels], minlength=len(class_names))
    targets = np.zeros((3, len(class_names)))
    for k, count in enumerate(class_counts):
        targets[:, k] = _largest_remainder(count, fractions)

    members: dict[str, list[int]] = {}
    for i, key in enumerate(group_keys):
        members.setdefault(key, []).append(i)
    keys = list(members)
    order = rng.permutation(len(keys))
    keys = [keys[j] for j in order]
    keys.sort(key=lambda key: -len(members[key]))  # stable: ties keep the seeded order

    current = np.zeros_like(targets)
    allowed = fractions > 0
    result = [""] * n
    for key in keys:
        counts = np.bincount([class_index[labels[i]] for i in members[key]], minlength=len(class_names))
        deficit = ((targets - current) * counts[None, :]).sum(axis=1) / max(counts.sum(), 1)
        deficit[~allowed] = -np.inf
        choice = int(np.argmax(deficit))
        current[choice] += counts
        for i in members[key]:
            result[i] = SPLITS[choice]
    return result


# --- helpers ------------------------------------------------------------------------------------------------
def _largest_remainder(count: int, fractions: np.ndarray) -> np.ndarray:
    raw = fractions * count
    base = np.floor(raw)
    left = int(count - base.sum())
    if left > 0:
        order = np.argsort(-(raw - base), kind="stable")
        base[order[:left]] += 1
    return base


def _raise_if(items: list[str], title: str, fix: str) -> None:
    if not items:
        return
    shown = "\n".join(f"  - {item}" for item in items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    raise ManifestError(f"{title} ({len(items)}):\n{shown}{more}\nfix: {fix}")


def _resolve(base: Path, path: str) -> str:
    candidate = Path(os.path.expanduser(path))
    return str((candidate if candidate.is_absolute() else base / candidate).resolve())


def _try_shape(path: str) -> tuple[tuple[int, int] | str, list[str]]:
    """((H, W) of a readable image, or the reason it cannot be read; the reader's notes about it)."""
    notes: list[str] = []
    try:
        image = read_image(path, notes)
    except ImageReadError as exc:
        return str(exc).removeprefix(f"{path}: "), notes
    return (int(image.shape[0]), int(image.shape[1])), notes


def _given_splits(table: pd.DataFrame, origin: str) -> list[str] | None:
    if "split" not in table.columns:
        return None
    values = [str(v).lower() for v in table["split"]]
    if all(v == "" for v in values):
        return None
    wrong = [
        f"{w}: split {v!r}" for w, v in zip(table["where"], values, strict=True) if v not in _SPLIT_ALIASES
    ]
    _raise_if(
        wrong, f"{origin}: invalid split values", "use train, val or test on every row (or drop the column)"
    )
    splits = [_SPLIT_ALIASES[v] for v in values]
    if "patient_id" in table.columns:
        seen: dict[str, set[str]] = {}
        for patient, split in zip(table["patient_id"], splits, strict=True):
            if patient:
                seen.setdefault(patient, set()).add(split)
        leaks = [f"patient {p!r} in {sorted(s)}" for p, s in seen.items() if len(s) > 1]
        _raise_if(
            leaks, f"{origin}: patients in more than one split", "give all images of a patient the same split"
        )
    return splits


def _patient_ids(table: pd.DataFrame) -> list[str | None]:
    if "patient_id" not in table.columns:
        return [None] * len(table)
    return [str(p) if p else None for p in table["patient_id"]]


def _boxes(table: pd.DataFrame, origin: str) -> list[str | None]:
    present = [c for c in _BOX_COLUMNS if c in table.columns]
    if not present:
        return [None] * len(table)
    if len(present) != len(_BOX_COLUMNS):
        raise ManifestError(
            f"{origin}: box columns {present} given without {[c for c in _BOX_COLUMNS if c not in present]}; "
            "boxes need all of x0,y0,x1,y1"
        )
    boxes: list[str | None] = []
    problems: list[str] = []
    for where, *cells in zip(table["where"], *(table[c] for c in _BOX_COLUMNS), strict=True):
        if all(cell == "" for cell in cells):
            boxes.append(None)
            continue
        try:
            x0, y0, x1, y1 = (float(cell) for cell in cells)
        except ValueError:
            problems.append(f"{where}: box {cells} is not four numbers")
            boxes.append(None)
            continue
        if not (x1 > x0 and y1 > y0):
            problems.append(f"{where}: box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] needs x1 > x0 and y1 > y0")
        values = [int(v) if float(v).is_integer() else v for v in (x0, y0, x1, y1)]
        boxes.append(json.dumps([values]))
    _raise_if(problems, f"{origin}: invalid boxes", "give x0,y0,x1,y1 in pixels (or leave all four empty)")
    return boxes


def _mask_paths(table: pd.DataFrame, base: Path, origin: str) -> list[str | None]:
    if "mask" not in table.columns:
        return [None] * len(table)
    paths: list[str | None] = [_resolve(base, m) if m else None for m in table["mask"]]
    missing = [
        f"{w}: {m}"
        for w, m in zip(table["where"], paths, strict=True)
        if m is not None and not Path(m).is_file()
    ]
    _raise_if(
        missing,
        f"{origin}: mask files not found",
        "fix the mask path (relative to the CSV's folder) or leave it empty",
    )
    return paths


def _ids(table: pd.DataFrame, base: Path) -> list[str]:
    stems = [Path(p).stem for p in table["abs_path"]]
    if len(set(stems)) == len(stems):
        return stems
    ids = []
    for path in table["abs_path"]:
        candidate = Path(path)
        try:
            ids.append(candidate.relative_to(base.resolve()).with_suffix("").as_posix())
        except ValueError:
            ids.append(candidate.with_suffix("").as_posix())
    return ids


def _typed(column: pd.Series) -> pd.Series:
    """An extra CSV column (read as text) as bool or numbers when every non-empty cell is one."""
    cells = column.astype(str)
    if cells.isin(["True", "False", "true", "false"]).all():
        return cells.str.lower() == "true"
    numeric = pd.to_numeric(cells.where(cells != ""), errors="coerce")  # empty cells → NaN
    if numeric.notna().sum() == (cells != "").sum():
        return numeric
    return column


def _write(folder: Path, frame: pd.DataFrame, classes: list[str]) -> None:
    write_parquet_atomic(folder / "manifest.parquet", frame)
    write_json_atomic(folder / "classes.json", list(classes))


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts per split and label, and the number of skipped images (for logs and the report)."""
    ok = frame[frame["status"] == "ok"]
    return {
        "n": len(frame),
        "skipped": int((frame["status"] != "ok").sum()),
        "per_split": {s: int((ok["split"] == s).sum()) for s in SPLITS},
        "per_label": {str(k): int(v) for k, v in ok["label"].value_counts().sort_index().items()},
    }
