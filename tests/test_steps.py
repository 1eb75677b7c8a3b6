"""The generic step runner (core/steps.py) on a hand-built three-step study, and the declared drift steps'
hashes covering only what each step reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from evidrift.core.distributed import Context
from evidrift.core.paths import RunPaths
from evidrift.core.steps import Step, StepError, check_steps, read_marker, run_steps, step_hashes
from evidrift.studies.config import parse_config, resolved_dict
from evidrift.studies.drift.study import STEPS
from evidrift.studies.drift.study import step_hashes as drift_hashes


class Inner(BaseModel):
    size: int = 8


class Toy(BaseModel):
    seed: int = 0
    a: Inner = Inner()
    b: Inner = Inner()


def _toy_steps(calls: list[str]) -> tuple[Step[Toy], ...]:
    def make(name: str, out: str):
        def run(config: Toy, paths: RunPaths, ctx: Context) -> None:
            calls.append(name)
            (paths.root / out).write_text(f"{name} {config.model_dump_json()}")

        return run

    return (
        Step("first", make("first", "first.txt"), config=("a",), outputs=lambda c, p: [p.root / "first.txt"]),
        Step("second", make("second", "second.txt"), reads=("first",), config=("b.size",),
             outputs=lambda c, p: [p.root / "second.txt"], clear_on_change=True),
        Step("third", make("third", "third.txt"), reads=("first",), config=("seed",),
             inputs=lambda c: {"derived": c.seed * 2}, outputs=lambda c, p: [p.root / "third.txt"]),
    )  # fmt: skip


def test_hashes_follow_the_declared_keys_and_the_steps_read() -> None:
    steps = _toy_steps([])
    base = step_hashes(steps, Toy())
    assert step_hashes(steps, Toy()) == base  # deterministic
    changed = step_hashes(steps, Toy(b=Inner(size=9)))
    assert {k for k in base if base[k] != changed[k]} == {"second"}
    changed = step_hashes(steps, Toy(a=Inner(size=9)))
    assert {k for k in base if base[k] != changed[k]} == {"first", "second", "third"}  # both read first
    changed = step_hashes(steps, Toy(seed=1))
    assert {k for k in base if base[k] != changed[k]} == {"third"}


def test_run_skips_done_steps_forces_and_stops(tmp_path: Path) -> None:
    calls: list[str] = []
    steps, paths, ctx = _toy_steps(calls), RunPaths.at(tmp_path), Context()
    results = run_steps(steps, Toy(), paths, ctx)
    assert [r.status for r in results] == ["ran"] * 3 and calls == ["first", "second", "third"]
    marker = read_marker(paths.step_marker("second"))
    assert marker is not None and marker["hash"] == step_hashes(steps, Toy())["second"]
    assert not paths.step_marker("second").with_suffix(".started.json").exists()
    calls.clear()
    assert [r.status for r in run_steps(steps, Toy(), paths, ctx)] == ["skipped"] * 3 and calls == []
    run_steps(steps, Toy(b=Inner(size=9)), paths, ctx)
    assert calls == ["second"]
    calls.clear()
    results = run_steps(steps, Toy(b=Inner(size=9)), paths, ctx, force=["second"], until="second")
    assert calls == ["second"] and [r.step for r in results] == ["first", "second"]
    assert not (tmp_path / "third.txt").exists()  # forced steps lose their outputs; --until stopped before it
    assert not paths.step_marker("third").exists()


def test_clear_on_change_removes_a_stale_partial_output(tmp_path: Path) -> None:
    calls: list[str] = []
    steps, paths = _toy_steps(calls), RunPaths.at(tmp_path)
    run_steps(steps, Toy(), paths, Context())
    stale = tmp_path / "second.txt"
    seen: list[bool] = []

    def run(config: Toy, p: RunPaths, ctx: Context) -> None:
        seen.append(stale.exists())
        stale.write_text("new")

    changed = tuple(s if s.name != "second" else Step(**{**s.__dict__, "run": run}) for s in steps)
    run_steps(changed, Toy(b=Inner(size=3)), paths, Context())
    assert seen == [False]  # its old output went before it ran again


def test_unknown_and_misdeclared_steps_are_refused(tmp_path: Path) -> None:
    steps = _toy_steps([])
    with pytest.raises(StepError, match="--force 'thrid': unknown step; choose one of first, second, third"):
        run_steps(steps, Toy(), RunPaths.at(tmp_path), Context(), force=["thrid"])
    with pytest.raises(StepError, match="--until 'x'"):
        run_steps(steps, Toy(), RunPaths.at(tmp_path), Context(), until="x")
    with pytest.raises(ValueError, match="reads \\['third'\\], which do not come before it"):
        check_steps((steps[0], Step("late", steps[0].run, reads=("third",)), steps[2]))
    with pytest.raises(KeyError, match=r"config key 'a\.nope' does not exist"):
        step_hashes((Step("x", steps[0].run, config=("a.nope",)),), Toy())


def test_editing_the_probe_or_sanity_sections_reruns_no_drift_step() -> None:
    base = parse_config({"models": [{"arch": "resnet18"}]})
    raw = resolved_dict(base)
    raw["probe"]["epochs"] = 7
    raw["sanity"]["n_images"] = 3
    edited = parse_config(raw)
    before, after = drift_hashes(base), drift_hashes(edited)
    assert {s for s in STEPS if before[s] != after[s]} == set()
