"""The study orchestration: step hashes over a DAG of config sections, markers, skip/resume/force, and the
kill-and-resume guarantee of `evidrift run` on a --quick-sized study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

import evidrift  # noqa: F401  (before timm)
from evidrift.core.distributed import Context
from evidrift.core.paths import RunPaths
from evidrift.core.steps import read_marker
from evidrift.studies.config import StudyConfig, parse_config, resolved_dict
from evidrift.studies.drift.presets import demo_config
from evidrift.studies.drift.study import STEPS, force_steps, run_study, step_hashes


def _changed(a: StudyConfig, b: StudyConfig) -> set[str]:
    ha, hb = step_hashes(a), step_hashes(b)
    return {s for s in STEPS if ha[s] != hb[s]}


def _edit(config: StudyConfig, **sections: dict) -> StudyConfig:
    raw = resolved_dict(config)
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return parse_config(raw)


def test_step_hashes_follow_what_each_step_reads() -> None:
    base = parse_config({"models": [{"arch": "resnet18"}]})
    assert _changed(base, base) == set()
    assert _changed(base, _edit(base, explain={"methods": ["gradcam", "layercam", "hirescam"]})) == {
        "explain",
        "drift",
        "report",
    }
    assert _changed(base, _edit(base, stats={"n_boot": 500})) == {"evaluate", "drift", "report"}
    assert _changed(base, _edit(base, drift={"size": 32})) == {"drift", "report"}
    assert _changed(base, _edit(base, report={"title": "x"})) == {"report"}
    assert _changed(base, _edit(base, output={"dir": "/elsewhere"})) == set()
    raw = resolved_dict(base)
    raw["train"]["stage1"]["lr"] = 0.01
    assert _changed(base, parse_config(raw)) == {"stage1", "stage2", "evaluate", "explain", "drift", "report"}
    raw = resolved_dict(base)
    raw["data"]["phantom"]["n"] = 80
    assert _changed(base, parse_config(raw)) == set(STEPS)
    pretrained = parse_config({"models": [{"arch": "resnet18", "weights": "/w.safetensors"}]})
    assert "stage0" not in _changed(pretrained, _edit(pretrained, train={"stage0": {"epochs": 1}}))


def test_force_steps_is_the_step_and_what_follows() -> None:
    assert force_steps("explain") == ["explain", "drift", "report"]
    assert force_steps("data") == list(STEPS)
    with pytest.raises(ValueError, match="--force 'explian': unknown step; choose one of data, stage0"):
        force_steps("explian")


class Recorder:
    """Stub step functions: record the calls, write one file per step, optionally fail once at a step."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def runners(self) -> dict[str, Callable[[StudyConfig, RunPaths, Context], None]]:
        def make(step: str) -> Callable[[StudyConfig, RunPaths, Context], None]:
            def run(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
                self.calls.append(step)
                if step == "explain":
                    (paths.root / "maps").mkdir(parents=True, exist_ok=True)
                    (paths.root / "maps" / f"{len(self.calls)}.part").write_text("x")
                if step == self.fail_at:
                    self.fail_at = None
                    raise RuntimeError(f"killed in {step}")

            return run

        return {step: make(step) for step in STEPS}


def test_run_skips_done_steps_resumes_after_a_failure_and_forces(tmp_path: Path) -> None:
    config = parse_config({"models": [{"arch": "resnet18"}]})
    paths = RunPaths.at(tmp_path / "run")
    rec = Recorder(fail_at="drift")
    with pytest.raises(RuntimeError, match="killed in drift"):
        run_study(config, paths, runners=rec.runners())
    assert rec.calls == ["data", "stage0", "stage1", "stage2", "evaluate", "explain", "drift"]
    assert read_marker(paths.step_marker("explain"))["hash"] == step_hashes(config)["explain"]
    assert read_marker(paths.step_marker("drift")) is None
    assert read_marker(paths.step_marker("drift").with_suffix(".started.json")) is not None
    assert paths.config.is_file() and yaml.safe_load(paths.config.read_text())["config_hash"]

    rec.calls.clear()
    results = run_study(config, paths, runners=rec.runners())
    assert rec.calls == ["drift", "report"]  # resumed where it stopped
    assert [r.status for r in results] == ["skipped"] * 6 + ["ran"] * 2
    assert not paths.step_marker("drift").with_suffix(".started.json").exists()

    rec.calls.clear()
    run_study(config, paths, runners=rec.runners())
    assert rec.calls == []

    rec.calls.clear()
    run_study(config, paths, runners=rec.runners(), force=["explain"])
    assert rec.calls == ["explain", "drift", "report"]
    assert [p.name for p in (paths.root / "maps").iterdir()] == ["1.part"]  # old maps removed before

    # a new explain method: explain is redone from scratch (maps of the old set removed), training is not
    rec.calls.clear()
    changed = _edit(config, explain={"methods": ["gradcam"]})
    run_study(changed, paths, runners=rec.runners(), until="explain")
    assert rec.calls == ["explain"]
    assert [p.name for p in (paths.root / "maps").iterdir()] == ["1.part"]


def test_unknown_names_fail_before_any_step(tmp_path: Path) -> None:
    rec = Recorder()
    with pytest.raises(ValueError, match="--until 'nope'"):
        run_study(parse_config({}), RunPaths.at(tmp_path), until="nope", runners=rec.runners())
    with pytest.raises(ValueError, match=r"explain\.methods: unknown CAM method 'gradcamm'"):
        run_study(
            parse_config({"explain": {"methods": ["gradcamm"]}}), RunPaths.at(tmp_path), runners=rec.runners()
        )
    with pytest.raises(ValueError, match=r"drift\.metrics: unknown drift metric 'ioux'"):
        run_study(
            parse_config({"drift": {"metrics": ["ioux"]}}), RunPaths.at(tmp_path), runners=rec.runners()
        )
    assert rec.calls == []


# --- kill and resume, the real pipeline ---------------------------------------------------------------------
def _write_study(path: Path, out: Path) -> Path:
    raw = resolved_dict(demo_config(quick=True, out=out))
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _evidrift(*args: str) -> list[str]:
    return [sys.executable, "-m", "evidrift", *args]


def _subprocess_env() -> dict[str, str]:
    """One thread count for every process of a comparison: oneDNN picks other kernels for other thread
    counts, and results are bit-identical only within one (a reference run at 1 thread and a resumed run at
    2 differed in the 4th digit)."""
    return {**os.environ, "OMP_NUM_THREADS": "2"}


def _run_killed_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 240) -> bool:
    """Start ``cmd``; SIGKILL it once ``ready()``; True when it was killed (False: it finished first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_subprocess_env())
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} did not reach the kill point in {timeout} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


@pytest.mark.slow  # SIGKILL twice, the real pipeline in subprocesses
@pytest.mark.integration
def test_kill_at_two_steps_and_resume_gives_the_same_drift_table(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    study = _write_study(tmp_path / "study.yaml", reference)
    subprocess.run(
        _evidrift("run", str(study), "--out", str(reference), "--until", "drift"),
        check=True,
        capture_output=True,
        env=_subprocess_env(),
    )
    paths = RunPaths.at(killed)

    def in_training() -> bool:  # stage 1 done: stage 2 (or its set-up) is running
        return paths.step_marker("stage1").is_file()

    def in_explain() -> bool:  # the first maps shard is written
        return any((killed / "maps").rglob("*.safetensors")) if (killed / "maps").is_dir() else False

    assert _run_killed_when(
        _evidrift("run", str(study), "--out", str(killed), "--until", "drift"), in_training
    )
    assert not paths.step_marker("stage2").is_file()
    assert _run_killed_when(
        _evidrift("run", str(study), "--out", str(killed), "--until", "drift"), in_explain
    )
    assert not paths.step_marker("drift").is_file()
    done = subprocess.run(
        _evidrift("run", str(study), "--out", str(killed), "--until", "drift"),
        capture_output=True,
        text=True,
        env=_subprocess_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[stage1] done before" in done.stdout
    expected = pd.read_parquet(reference / "drift.parquet")
    got = pd.read_parquet(killed / "drift.parquet")
    pd.testing.assert_frame_equal(got, expected)
    assert not (killed / "report.html").exists()  # --until drift
