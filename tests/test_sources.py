"""Data sources: class folders, CSV manifests, the phantom source, splits and every manifest check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from evidrift.core.paths import RunPaths
from evidrift.data.sources import (
    MANIFEST_COLUMNS,
    ManifestError,
    assign_splits,
    load_manifest,
    prepare_data,
    prepare_source_data,
)
from evidrift.studies.config import parse_config


def _png(path: Path, size: tuple[int, int] = (8, 8), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8), mode="L").save(path)
    return path


def _csv(folder: Path, rows: list[dict[str, object]], name: str = "data.csv") -> Path:
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _csv_config(csv: Path, **data: object) -> object:
    return parse_config({"data": {"source": "csv", "path": str(csv), **data}})


def _rows(
    folder: Path, n_per_class: int = 4, classes: tuple[str, ...] = ("a", "b")
) -> list[dict[str, object]]:
    rows = []
    for label in classes:
        for i in range(n_per_class):
            rows.append(
                {
                    "path": _png(folder / "img" / f"{label}{i}.png").relative_to(folder).as_posix(),
                    "label": label,
                }
            )
    return rows


def test_class_folders_give_a_complete_manifest(tmp_path: Path) -> None:
    for label in ("cat", "dog"):
        for i in range(5):
            _png(tmp_path / "data" / label / f"{i}.png")
    (tmp_path / "data" / "dog" / "notes.txt").write_text("not an image")
    config = parse_config({"data": {"source": "folder", "path": str(tmp_path / "data")}})
    paths = RunPaths.at(tmp_path / "run")
    frame = prepare_data(config, paths)
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert len(frame) == 10 and (frame["status"] == "ok").all()
    assert frame["id"].is_unique  # stems collide (0..4 in both classes) → relative paths
    assert set(frame["id"]) >= {"cat/0", "dog/4"}
    assert frame["label_idx"].tolist() == [0] * 5 + [1] * 5
    assert all(Path(p).is_absolute() for p in frame["path"])
    loaded, classes = load_manifest(paths)
    assert classes == ["cat", "dog"]
    assert json.loads((paths.data_dir / "classes.json").read_text()) == ["cat", "dog"]
    pd.testing.assert_frame_equal(
        loaded[["id", "label", "split"]], frame[["id", "label", "split"]], check_dtype=False
    )


def test_folder_with_unknown_or_empty_class(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "cat" / "0.png")
    _png(tmp_path / "data" / "dgo" / "0.png")
    config = parse_config(
        {"data": {"source": "folder", "path": str(tmp_path / "data"), "classes": ["cat", "dog"]}}
    )
    with pytest.raises(ManifestError, match=r"sub-folder\(s\) \['dgo'\] are not in data.classes"):
        prepare_data(config, RunPaths.at(tmp_path / "run"))
    (tmp_path / "data" / "dgo" / "0.png").unlink()
    (tmp_path / "data" / "dgo").rmdir()
    (tmp_path / "data" / "dog").mkdir()
    with pytest.raises(ManifestError, match=r"class\(es\) \['dog'\] have no images"):
        prepare_data(config, RunPaths.at(tmp_path / "run"))


def test_csv_with_all_optional_columns(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    for i, row in enumerate(rows):
        row.update(patient_id=f"p{i // 2}", x0="", y0="", x1="", y1="", mask="")
    rows[0].update(x0=1, y0=2, x1=5, y1=6)
    rows[1]["mask"] = _png(tmp_path / "masks" / "m.png", value=255).relative_to(tmp_path).as_posix()
    frame = prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))
    assert json.loads(frame.loc[0, "bbox"]) == [[1, 2, 5, 6]]
    assert pd.isna(frame.loc[2, "bbox"])
    assert frame.loc[1, "mask_path"] == str((tmp_path / "masks" / "m.png").resolve())
    assert frame.loc[0, "patient_id"] == "p0"
    # patients p0 (rows 0, 1), p1 (rows 2, 3) ... never split
    for patient, group in frame.groupby("patient_id"):
        assert group["split"].nunique() == 1, patient


def test_csv_split_column_is_used(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 3)
    for row, split in zip(rows, ["train", "val", "test"] * 2, strict=True):
        row["split"] = split.upper() if split == "val" else split
    frame = prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))
    assert frame["split"].tolist() == ["train", "val", "test"] * 2


# --- every manifest error names the file/row and the fix ----------------------------------------------------
def test_missing_columns(tmp_path: Path) -> None:
    csv = _csv(tmp_path, [{"file": "a.png", "label": "a"}])
    with pytest.raises(
        ManifestError, match=r"data\.csv: missing column\(s\) \['path'\].*at least `path,label`"
    ):
        prepare_data(_csv_config(csv), RunPaths.at(tmp_path / "run"))


def test_missing_file(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[3]["path"] = "img/gone.png"
    with pytest.raises(
        ManifestError, match=r"image files not found \(1\):\n  - .*data\.csv line 5: .*gone\.png\nfix: "
    ):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))


def test_unknown_label(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[2]["label"] = "c"
    with pytest.raises(
        ManifestError,
        match=r"(?s)labels not in the classes \['a', 'b'\].*line 4: label 'c'.*add it to data\.classes",
    ):
        prepare_data(_csv_config(_csv(tmp_path, rows), classes=["a", "b"]), RunPaths.at(tmp_path / "run"))


def test_empty_class(tmp_path: Path) -> None:
    csv = _csv(tmp_path, _rows(tmp_path))
    with pytest.raises(
        ManifestError, match=r"class\(es\) \['c'\] have no images; .*remove them from data\.classes"
    ):
        prepare_data(_csv_config(csv, classes=["a", "b", "c"]), RunPaths.at(tmp_path / "run"))


def test_duplicate_path(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[5]["path"] = "./" + str(rows[1]["path"])
    with pytest.raises(
        ManifestError,
        match=r"listed more than once \(1\):\n  - .*a1\.png in .*line 3, .*line 7\nfix: keep one row",
    ):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))


def test_mask_of_the_wrong_size(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[0]["mask"] = _png(tmp_path / "m.png", size=(8, 9)).name
    with pytest.raises(ManifestError, match=r"line 2: mask .*m\.png is 9x8 \(WxH\) but the image is 8x8"):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))


def test_missing_mask_bad_box_bad_split_and_patient_leak(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[0]["mask"] = "nomask.png"
    with pytest.raises(ManifestError, match=r"mask files not found \(1\):\n  - .*line 2: .*nomask\.png"):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))
    rows = _rows(tmp_path)
    for row in rows:
        row.update(x0="", y0="", x1="", y1="")
    rows[1].update(x0=5, y0=0, x1=3, y1=4)
    with pytest.raises(ManifestError, match=r"line 3: box \[5, 0, 3, 4\] needs x1 > x0"):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))
    rows[1].update(x0=0, y0=0, x1=30, y1=4)
    with pytest.raises(ManifestError, match=r"line 3: box \[0, 0, 30, 4\] lies outside the 8x8 image"):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))
    rows = _rows(tmp_path)
    for row in rows:
        row["split"] = "train"
    rows[4]["split"] = "hold-out"
    with pytest.raises(ManifestError, match=r"(?s)line 6: split 'hold-out'.*use train, val or test"):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))
    rows[4]["split"] = "test"
    for row in rows:
        row["patient_id"] = "same"
    with pytest.raises(ManifestError, match=r"patient 'same' in \['test', 'train'\]"):
        prepare_data(_csv_config(_csv(tmp_path, rows)), RunPaths.at(tmp_path / "run"))


def _corrupt_rows(tmp_path: Path) -> list[dict[str, object]]:
    rows = _rows(tmp_path)
    (tmp_path / "img" / "a2.png").write_bytes(b"")
    data = (tmp_path / "img" / "b1.png").read_bytes()
    (tmp_path / "img" / "b1.png").write_bytes(data[:30])
    return rows


def test_bad_images_error_by_default(tmp_path: Path) -> None:
    csv = _csv(tmp_path, _corrupt_rows(tmp_path))
    with pytest.raises(
        ManifestError,
        match=r"(?s)unreadable images \(2\):\n  - .*line 4: the file is empty.*\n  - .*line 7: "
        r".*on_bad_image: skip",
    ):
        prepare_data(_csv_config(csv), RunPaths.at(tmp_path / "run"))


def test_bad_images_skipped_are_logged_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv = _csv(tmp_path, _corrupt_rows(tmp_path))
    with caplog.at_level(logging.WARNING, logger="evidrift.data.sources"):
        frame = prepare_data(_csv_config(csv, on_bad_image="skip"), RunPaths.at(tmp_path / "run"))
    skipped = frame[frame["status"] != "ok"]
    assert skipped["id"].tolist() == ["a2", "b1"]
    assert skipped["status"].iloc[0] == "skipped: the file is empty (0 bytes); re-export or remove it"
    assert skipped["status"].iloc[1].startswith("skipped: ")
    assert "2 of 8 images skipped" in caplog.text and "a2.png" in caplog.text


# --- splits -------------------------------------------------------------------------------------------------
def test_stratified_split_hits_exact_targets() -> None:
    labels = ["a"] * 40 + ["b"] * 20
    splits = assign_splits(labels, None, val=0.15, test=0.25, seed=0)
    table = pd.crosstab(pd.Series(labels, name="label"), pd.Series(splits, name="split"))
    assert table.loc["a"].to_dict() == {"test": 10, "train": 24, "val": 6}
    assert table.loc["b"].to_dict() == {"test": 5, "train": 12, "val": 3}
    assert splits == assign_splits(labels, None, val=0.15, test=0.25, seed=0)
    assert splits != assign_splits(labels, None, val=0.15, test=0.25, seed=1)


def test_grouped_split_keeps_patients_together_and_stays_near_targets() -> None:
    rng = np.random.default_rng(0)
    groups, labels = [], []
    for patient in range(120):
        label = "ab"[patient % 2]
        for _ in range(int(rng.integers(1, 5))):
            groups.append(f"p{patient}")
            labels.append(label)
    splits = assign_splits(labels, groups, val=0.2, test=0.2, seed=3)
    frame = pd.DataFrame({"g": groups, "label": labels, "split": splits})
    assert (frame.groupby("g")["split"].nunique() == 1).all()
    shares = frame["split"].value_counts(normalize=True)
    assert abs(shares["test"] - 0.2) < 0.03 and abs(shares["val"] - 0.2) < 0.03
    for _, part in frame.groupby("label"):
        assert abs((part["split"] == "test").mean() - 0.2) < 0.05


def test_zero_val_fraction_gives_no_val() -> None:
    splits = assign_splits(["a"] * 10, None, val=0.0, test=0.3, seed=0)
    assert splits.count("val") == 0 and splits.count("test") == 3


# --- phantom source -----------------------------------------------------------------------------------------
def test_phantom_source_is_generated_once_and_reused(tmp_path: Path) -> None:
    config = parse_config({"data": {"phantom": {"n": 10, "size": 40, "n_source": 10}}})
    paths = RunPaths.at(tmp_path / "run")
    frame = prepare_data(config, paths)
    assert sorted(frame["label"].unique()) == sorted(load_manifest(paths)[1])
    assert frame["mask_path"].notna().all()
    assert frame["marker"].dtype == bool and not frame["marker"].any()  # extra CSV columns are typed
    stamp = (paths.data_dir / "phantoms" / "manifest.csv").stat().st_mtime_ns
    prepare_data(config, paths)
    assert (paths.data_dir / "phantoms" / "manifest.csv").stat().st_mtime_ns == stamp
    source = prepare_source_data(config, paths)
    assert source["label"].nunique() == 10 and (source["status"] == "ok").all()
    loaded, classes = load_manifest(paths, source=True)
    assert len(loaded) == 10 and len(classes) == 10


def test_load_manifest_before_prepare_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.parquet does not exist; prepare the data first"):
        load_manifest(RunPaths.at(tmp_path))
