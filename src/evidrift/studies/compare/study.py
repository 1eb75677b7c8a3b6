"""`evidrift compare A B --data D`: explanation drift between two checkpoints of one model, as a CI gate.

The comparison is a small study in its own run directory: the two checkpoints play the parts of stage 1 (A,
the reference) and stage 2 (B, the candidate), linked into ``models/{arch}/stage{1,2}.*``; every usable image
of ``--data`` (or of one split of a CSV that has a ``split`` column) is marked ``test``; then the study's own
evaluate, explain (``samples: all``, target = the label), drift and report steps run, so a comparison and a
study compute everything the same way. It is recomputed from scratch every time — a gate must never pass on
a stale result. ``check_gates`` turns ``--fail-below METRIC=V`` / ``--fail-above METRIC=V`` into messages
naming the metric, the method, the threshold and the mean value that fails.

With a band (``baseline``: a second checkpoint A2 of A's recipe; or ``input-noise``), the band's per-image
drift is written to ``OUT/band/drift.parquet`` (``evidrift.studies.compare.band``); with gates, every verdict
(``studies.compare.gates``, fixed thresholds and band gates) goes to ``OUT/gate/verdicts.json`` together
with where the evidence moved (``studies.compare.where``: per class, per zone, most-drifted images), all
before the report is built, so the report shows them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from evidrift import stats
from evidrift.core import steps
from evidrift.core.distributed import Context
from evidrift.core.errors import EvidriftError
from evidrift.core.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.core.steps import Step
from evidrift.studies.config import StudyConfig, dump_yaml, parse_config
from evidrift.studies.drift.analysis import DriftSettings
from evidrift.studies.drift.config import DEFAULT_EXPLAIN_METHODS
from evidrift.studies.drift.localization import write_localization
from evidrift.studies.drift.study import drift_settings

if TYPE_CHECKING:
    from evidrift.classifier.checkpoint import CheckpointMeta
    from evidrift.studies.compare.band import Perturbation
    from evidrift.studies.compare.gates import GateSpec, Verdict

SPLITS = ("all", "train", "val", "test")
BANDS = ("baseline", "input-noise")


class CompareError(EvidriftError, ValueError):
    """Checkpoints that cannot be compared, or a gate that cannot be checked; the message says why and how."""


@dataclass(frozen=True)
class CompareResult:
    """A finished comparison: its run directory, model key, number of images, ``summary.csv``; with a band
    its kind and per-image table; with gates the verdicts and the where-tables (``compare_where``);
    ``context``: what the JSON/JUnit files record about the run; ``seconds``: wall time."""

    paths: RunPaths
    arch: str
    n_images: int
    summary: pd.DataFrame
    drift: pd.DataFrame | None = None
    band_kind: str | None = None
    band: pd.DataFrame | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    where: dict[str, pd.DataFrame] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --- checks -------------------------------------------------------------------------------------------------
def checkpoint_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """The sidecar of a checkpoint (verified against its weights); CompareError naming the file otherwise."""
    from evidrift.classifier.checkpoint import read_checkpoint_meta, sidecar_path

    file = Path(path)
    if file.is_file() and (file.suffix != ".safetensors" or not sidecar_path(file).is_file()):
        raise CompareError(
            f"{file} is not an evidrift checkpoint: compare needs a .safetensors file with the .json sidecar "
            "that evidrift writes beside it (architecture, classes, input size, normalization); train it "
            "with evidrift (`evidrift run` / `evidrift train`), or rebuild the model and save it with "
            "`evidrift.classifier.checkpoint.save_checkpoint(path, model, meta)`"
        )
    try:
        return read_checkpoint_meta(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CompareError(f"cannot read checkpoint {path}: {exc}") from None


def check_compatible(a: Path, meta_a: CheckpointMeta, b: Path, meta_b: CheckpointMeta) -> None:
    """Raise CompareError unless A and B are the same architecture with the same class list (same order)."""
    arch_a, arch_b = meta_a.timm_name or meta_a.arch, meta_b.timm_name or meta_b.arch
    if arch_a != arch_b:
        raise CompareError(
            f"checkpoints of different architectures: {a} is {arch_a!r}, {b} is {arch_b!r}; "
            "compare two checkpoints of one model (e.g. before and after an update)"
        )
    classes_a, classes_b = list(meta_a.classes), list(meta_b.classes)
    if classes_a != classes_b:
        only_a = sorted(set(classes_a) - set(classes_b))
        only_b = sorted(set(classes_b) - set(classes_a))
        detail = (
            f"only in A: {only_a}, only in B: {only_b}"
            if (only_a or only_b)
            else "same names in another order"
        )
        raise CompareError(
            f"checkpoints with different class lists: {a} has {classes_a}, {b} has {classes_b} ({detail}); "
            "maps of different target classes cannot be compared"
        )


def resolve_gates(names: Iterable[str]) -> dict[str, str]:
    """{given name: canonical metric name}; CompareError naming an unknown metric and the known ones."""
    from evidrift.metrics.drift import resolve_metric

    out = {}
    for name in names:
        try:
            out[name] = resolve_metric(name)[0]
        except ValueError as exc:
            raise CompareError(f"gate metric {name!r}: {exc}") from None
    return out


def check_gates(
    summary: pd.DataFrame, fail_below: Mapping[str, float], fail_above: Mapping[str, float]
) -> list[str]:
    """One message per failed gate and method: the mean of the metric over the images (``summary.csv``) must
    be ≥ the ``fail_below`` threshold and ≤ the ``fail_above`` one. A NaN mean (every map degenerate)
    fails. (The messages of the failed ``compare_gates.threshold_verdicts``.)"""
    from evidrift.studies.compare.gates import threshold_verdicts

    return [v.message for v in threshold_verdicts(summary, fail_below, fail_above) if not v.passed]


# --- the comparison -----------------------------------------------------------------------------------------
def _link(source: Path, target: Path) -> None:
    """``target`` → ``source`` (symlink; a copy where links are not allowed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)


def compare_config(
    meta: CheckpointMeta, data: Path, out: Path, methods: Sequence[str] | None, max_images: int | None
) -> StudyConfig:
    """The study that compares two checkpoints described by ``meta`` on the images of ``data``."""
    source = "csv" if data.is_file() else "folder"
    raw = {
        "data": {
            "source": source,
            "path": str(data.resolve()),
            "classes": list(meta.classes),
            "augment": False,
            "on_bad_image": "skip",
        },
        "models": [
            {
                "arch": meta.timm_name or meta.arch,
                "weights": "compare",
                "name": meta.key or meta.arch,
                "image_size": meta.image_size,
                "head": meta.head,
                "cam_layers": list(meta.cam_layers or ["default"]),
            }
        ],
        "explain": {
            "methods": list(methods or DEFAULT_EXPLAIN_METHODS),
            "samples": "all",
            "target": "label",
            "max_images": max_images,
        },
        "train": {"loss": meta.loss},
        "report": {"title": "evidrift compare: checkpoint A → B"},
        "output": {"dir": str(out)},
    }
    return parse_config(raw, "the compare study")


def _select_images(paths: RunPaths, split: str) -> int:
    """Mark the images to compare as the ``test`` split of the run's manifest; returns how many."""
    manifest = pd.read_parquet(paths.manifest)
    chosen = manifest["status"] == "ok"
    if split != "all":
        chosen &= manifest["split"] == split
    if not chosen.any():
        raise CompareError(f"no usable image in {paths.manifest} for --split {split}")
    manifest["split"] = manifest["split"].where(~chosen, "test")
    manifest.loc[~chosen & (manifest["split"] == "test"), "split"] = "val"
    write_parquet_atomic(paths.manifest, manifest)
    return int(chosen.sum())


def _band_kind(baseline: Path | None, band: str | None) -> str | None:
    if band is not None and band not in BANDS:
        raise CompareError(f"--band {band!r}: choose baseline (with --baseline A2) or input-noise")
    if baseline is not None and band == "input-noise":
        raise CompareError(
            "--baseline and --band input-noise: choose one band (a baseline checkpoint is the stronger one)"
        )
    if band == "baseline" and baseline is None:
        raise CompareError("--band baseline needs --baseline A2: a second checkpoint of A's recipe")
    return "baseline" if baseline is not None else band


def compare_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    methods: Sequence[str] | None = None,
    split: str = "all",
    max_images: int | None = None,
    gates: Iterable[str] = (),
    baseline: str | os.PathLike[str] | None = None,
    band: str | None = None,
    perturbation: Perturbation | None = None,
    gate_spec: GateSpec | None = None,
    most_drifted: int = 5,
    progress: bool = False,
) -> CompareResult:
    """Explain every usable image of ``data`` with checkpoints ``a`` and ``b`` and measure the drift A → B;
    writes the run directory ``out`` (drift.parquet, summary.csv, report.html, ...). ``gates``: metric names
    checked up front, so that a typo fails before any work.

    ``baseline`` (a checkpoint A2 of A's recipe) or ``band="input-noise"`` (with ``perturbation``): also
    measure the noise band (``compare_band``). ``gate_spec``: evaluate every gate (``compare_gates``) and
    write ``OUT/gate/`` (verdicts.json and the where-tables, ``most_drifted`` images per method) before the
    report. Everything the user passed is checked before any work (CompareError)."""
    started = time.perf_counter()
    a, b, data, out = Path(a), Path(b), Path(data), Path(out)
    baseline = Path(baseline) if baseline is not None else None
    if split not in SPLITS:
        raise CompareError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if not data.exists():
        raise CompareError(f"--data {data} does not exist; pass a folder of class folders or a CSV manifest")
    resolve_gates(gates)
    from evidrift.cam import resolve_method

    for method in methods or ():
        try:
            resolve_method(method)
        except ValueError as exc:
            raise CompareError(f"--methods: {exc}") from None
    explained = [resolve_method(m) for m in (methods or DEFAULT_EXPLAIN_METHODS)]
    band_kind = _band_kind(baseline, band)
    if gate_spec is not None:
        gate_spec.check(explained)
        if gate_spec.band and band_kind is None:
            raise CompareError(
                "--fail-beyond-band needs a band: pass --baseline A2 (a second checkpoint of A's recipe) or "
                "--band input-noise"
            )
    if band_kind == "input-noise":
        from evidrift.studies.compare.band import Perturbation

        perturbation = perturbation or Perturbation()
        try:
            perturbation.check()
        except ValueError as exc:
            raise CompareError(str(exc)) from None
    meta_a, meta_b = checkpoint_meta(a), checkpoint_meta(b)
    check_compatible(a, meta_a, b, meta_b)
    if baseline is not None:
        check_compatible(a, meta_a, baseline, checkpoint_meta(baseline))
    config = compare_config(meta_a, data, out, methods, max_images)
    job = CompareJob(
        a=a, b=b, data=data, split=split, max_images=max_images, baseline=baseline, band_kind=band_kind,
        perturbation=perturbation, gate_spec=gate_spec, most_drifted=most_drifted, methods=explained,
        progress=progress, image_size=meta_a.preprocessing(a)[0],
    )  # fmt: skip
    from evidrift.core import distributed

    paths = RunPaths.at(out)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.config, dump_yaml(config))
    ctx = distributed.setup(config.train.device)
    # A gate must never pass on a stale result: every step is redone (its markers record what ran, how long).
    steps.run_steps(job.steps(), config, paths, ctx, force=["all"])
    return CompareResult(
        paths,
        job.key,
        job.n_images,
        job.summary,
        job.drift,
        band_kind,
        job.band_drift,
        job.verdicts,
        job.where,
        job.context,
        time.perf_counter() - started,
    )


@dataclass
class CompareJob:
    """One comparison: what the user asked for, and what its steps found (filled in as they run)."""

    a: Path
    b: Path
    data: Path
    split: str
    max_images: int | None
    baseline: Path | None
    band_kind: str | None
    perturbation: Perturbation | None
    gate_spec: GateSpec | None
    most_drifted: int
    methods: list[str]
    progress: bool
    image_size: int
    key: str = ""
    n_images: int = 0
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    drift: pd.DataFrame | None = None
    band_drift: pd.DataFrame | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    where: dict[str, pd.DataFrame] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def steps(self) -> tuple[Step[StudyConfig], ...]:
        """The comparison as a study: data (images + the two checkpoints linked in as stages 1 and 2),
        evaluate, explain, drift, band, gate, report."""
        request = {"a": str(self.a), "b": str(self.b), "data": str(self.data), "split": self.split}
        return (
            Step("data", self.run_data, config=("data",), inputs=lambda c: request,
                 outputs=lambda c, p: [p.data_dir, p.models_dir]),
            Step("evaluate", self.run_evaluate, reads=("data",), config=("stats",),
                 outputs=lambda c, p: [p.eval_dir]),
            Step("explain", self.run_explain, reads=("data",), config=("explain",),
                 outputs=lambda c, p: [p.maps_root]),
            Step("drift", self.run_drift, reads=("explain",), config=("drift", "stats"),
                 outputs=lambda c, p: [p.drift, p.summary, p.localization_summary]),
            Step("band", self.run_band, reads=("drift",), inputs=lambda c: {"band": self.band_kind},
                 outputs=lambda c, p: [p.band_dir]),
            Step("gate", self.run_gate, reads=("band",), outputs=lambda c, p: [p.gate_dir]),
            Step("report", self.run_report, reads=("gate", "evaluate"), config=("report",),
                 outputs=lambda c, p: [p.report, p.figures_dir]),
        )  # fmt: skip

    def run_data(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.data.sources import prepare_data

        prepare_data(config, paths, input_size=self.image_size)
        self.n_images = _select_images(paths, self.split)
        if self.max_images is not None:
            self.n_images = min(self.n_images, self.max_images)
        self.key = config.models[0].key
        for stage, checkpoint in (("1", self.a), ("2", self.b)):
            target = paths.checkpoint(self.key, stage)
            _link(checkpoint, target)
            _link(checkpoint.with_suffix(".json"), target.with_suffix(".json"))

    def run_evaluate(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.classifier.evaluate import evaluate_study

        scope = "every usable image" if self.split == "all" else f"the {self.split} split"
        evaluate_study(config, paths, ctx=ctx, title=f"classification of {scope} of --data")

    def run_explain(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.studies.drift.explain import explain_run

        for stage in (1, 2):
            explain_run(config, paths, self.key, stage, ctx=ctx, progress=False)

    def run_drift(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.studies.drift.analysis import run_drift

        settings = drift_settings(config)
        drift = run_drift(paths.root, settings, progress=False).drift
        self.drift = stats.keyed_by_map_set(drift)  # the gates key map sets (method[@layer])
        write_localization(config, paths, settings)
        summary = pd.read_csv(paths.summary)
        if summary["layer"].nunique() > 1:  # as the map sets are named
            summary = summary.assign(method=summary["method"] + "@" + summary["layer"].astype(str))
        self.summary = summary

    def run_band(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.studies.compare.band import band_record

        settings = drift_settings(config)
        self.band_drift = _band(
            config, paths, self.key, self.a, self.baseline, self.band_kind, self.perturbation, settings,
            self.progress,
        )  # fmt: skip
        self.context = {
            "a": str(self.a),
            "b": str(self.b),
            "baseline": str(self.baseline) if self.baseline is not None else None,
            "band": band_record(paths) or None,
            "data": str(self.data),
            "n_images": self.n_images,
            "methods": self.methods,
            "alpha": self.gate_spec.alpha if self.gate_spec is not None else None,
            "tolerance": self.gate_spec.tolerance if self.gate_spec is not None else None,
            "run_dir": str(paths.root),
            "report": str(paths.report),
        }

    def run_gate(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        assert self.drift is not None, "the drift step runs before the gate step"
        self.verdicts, self.where = _gate(
            paths, config, self.summary, self.drift, self.band_drift, self.band_kind, self.gate_spec,
            self.methods, self.most_drifted, self.context,
        )  # fmt: skip

    def run_report(self, config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.studies.drift.report import build_report

        a, b = self.a, self.b
        build_report(
            paths.root, config, stage_labels=(f"A ({a.name})", f"B ({b.name})"), subtitle=f"A = {a}, B = {b}"
        )


def _band(
    config: StudyConfig,
    paths: RunPaths,
    key: str,
    a: Path,
    baseline: Path | None,
    band_kind: str | None,
    perturbation: Perturbation | None,
    settings: DriftSettings,
    progress: bool,
) -> pd.DataFrame | None:
    """The band's per-image drift table (None without a band)."""
    from evidrift.studies.compare.band import baseline_drift, input_noise_drift

    if band_kind == "baseline" and baseline is not None:
        return baseline_drift(config, paths, key, a, baseline, settings, _link)
    if band_kind == "input-noise" and perturbation is not None:
        return input_noise_drift(config, paths, key, perturbation, settings, progress=progress)
    return None


def _gate(
    paths: RunPaths,
    config: StudyConfig,
    summary: pd.DataFrame,
    drift: pd.DataFrame,
    band_drift: pd.DataFrame | None,
    band_kind: str | None,
    spec: GateSpec | None,
    methods: Sequence[str],
    k: int,
    context: Mapping[str, Any],
) -> tuple[list[Verdict], dict[str, pd.DataFrame]]:
    """Verdicts of every gate and the where-tables, written to ``OUT/gate/`` (verdicts.json + CSVs)."""
    from evidrift.studies.compare.gates import all_verdicts
    from evidrift.studies.compare.verdicts import verdicts_document
    from evidrift.studies.compare.where import write_where

    verdicts: list[Verdict] = []
    gated: list[str] = []
    if spec is not None:
        s = config.stats
        verdicts = all_verdicts(summary, drift, band_drift, spec, band_kind, methods, s.n_boot, s.ci, s.seed)
        band_first = [v for v in verdicts if v.gate == "fail-beyond-band"] + verdicts
        gated = list(dict.fromkeys(v.metric for v in band_first))
    where = write_where(paths, drift, band_drift, gated, config.drift.zone_grid, k)
    write_json_atomic(paths.gate_dir / "verdicts.json", verdicts_document(verdicts, context))
    return verdicts, where
