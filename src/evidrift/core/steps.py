"""Steps and the one runner every study uses: hashes, markers, resume, ``--force``, ``--until``, barriers.

A study is a list of ``Step``s (see ``docs/ARCHITECTURE.md``, "The step model"). Each step declares what its
result depends on — the earlier steps it reads (``reads``), the config keys it uses (``config``, dotted paths
into the study's config) and anything else computed from the config (``inputs``: a data fingerprint, the
hashes of checkpoints) — and what it writes (``outputs``). Its *hash* is the hash of its own inputs and the
hashes of the steps it reads, so a change reruns exactly the steps downstream of it: a new ``stats.n_boot``
reruns what reads the statistics and never the training.

``run_steps`` runs a list in order. A step runs in three moves:

1. ``steps/{name}.started.json`` is written with the hash (a later run knows what a partial output is);
2. its ``run(config, paths, ctx)`` runs — long steps are resumable themselves (epoch checkpoints, shards), so
   a step killed half-way resumes where it stopped;
3. ``steps/{name}.json`` is written last with the hash, the wall and CPU seconds.

A step whose marker holds its current hash is skipped. A step marked ``clear_on_change`` whose last hash
differs has its outputs removed before it runs (partial outputs of another config cannot be resumed).
``force`` names steps to redo: each of them and every step after it loses its outputs and markers first.
``until`` stops after the named step. Under ``torchrun`` every rank calls ``run`` (each does its share or
returns at once when it is rank 0's work); rank 0 alone writes markers and removes outputs, and every move
ends at a barrier.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from evidrift.core import distributed
from evidrift.core.distributed import Context
from evidrift.core.errors import EvidriftError
from evidrift.core.io import config_hash, write_json_atomic
from evidrift.core.paths import RunPaths

C = TypeVar("C", bound=BaseModel)
Printer = Callable[[str], None]


class StepError(EvidriftError, ValueError):
    """A step name that is not in the study (``--force``, ``--until``); the message lists the steps."""


@dataclass(frozen=True)
class Step(Generic[C]):
    """One step of a study.

    ``run(config, paths, ctx)`` does the work (every rank calls it). ``reads``: names of earlier steps whose
    outputs it reads; their hashes are part of its hash. ``config``: dotted keys of the study's config whose
    values its hash covers (``"stats"``, ``"train.stage2"``, ``"seed"``). ``inputs``: further hashed inputs
    computed from the config (JSON-able). ``outputs``: the files and folders it writes, removed by
    ``--force`` and, with ``clear_on_change``, before it reruns with another hash.
    """

    name: str
    run: Callable[[C, RunPaths, Context], None]
    reads: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    inputs: Callable[[C], Mapping[str, Any]] | None = None
    outputs: Callable[[C, RunPaths], Iterable[Path]] | None = None
    clear_on_change: bool = False


@dataclass
class StepResult:
    step: str
    status: str  # "ran" or "skipped"
    seconds: float
    digest: str


def check_steps(steps: Sequence[Step[C]]) -> None:
    """Raise ValueError when two steps share a name or a step reads one that does not come before it (a bug in
    a study's declaration, not a user error)."""
    seen: set[str] = set()
    for step in steps:
        if step.name in seen:
            raise ValueError(f"two steps are named {step.name!r}")
        missing = [r for r in step.reads if r not in seen]
        if missing:
            raise ValueError(f"step {step.name!r} reads {missing}, which do not come before it")
        seen.add(step.name)


def config_value(config: BaseModel, key: str) -> Any:
    """The JSON-able value at dotted ``key`` of ``config`` (``"train.stage2.lr"``); KeyError names it."""
    value: Any = config.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"config key {key!r} does not exist (at {part!r})")
        value = value[part]
    return value


def step_hashes(steps: Sequence[Step[C]], config: C) -> dict[str, str]:
    """The hash of every step: its config keys' values, its extra inputs, the hashes of the steps it reads."""
    hashes: dict[str, str] = {}
    for step in steps:
        own: dict[str, Any] = {key: config_value(config, key) for key in step.config}
        if step.inputs is not None:
            own["inputs"] = dict(step.inputs(config))
        upstream = {name: hashes[name] for name in step.reads}
        hashes[step.name] = config_hash({"step": step.name, "inputs": own, "upstream": upstream})
    return hashes


# --- markers ------------------------------------------------------------------------------------------------
def started_path(paths: RunPaths, step: str) -> Path:
    return paths.step_marker(step).with_suffix(".started.json")


def read_marker(path: Path) -> dict[str, Any] | None:
    """A marker's content, or None when it is absent or unreadable (an interrupted write is never valid)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def step_done(paths: RunPaths, step: str, digest: str) -> bool:
    """True when ``steps/{step}.json`` holds ``digest``."""
    marker = read_marker(paths.step_marker(step))
    return marker is not None and marker.get("hash") == digest


def previous_hash(paths: RunPaths, step: str) -> str | None:
    """The hash the step last started or finished with (None when it never ran here)."""
    for path in (started_path(paths, step), paths.step_marker(step)):
        marker = read_marker(path)
        if marker is not None:
            return str(marker.get("hash"))
    return None


def remove(*targets: Path) -> None:
    """Delete files and folders (missing ones are fine)."""
    for target in targets:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def clear_step(step: Step[C], config: C, paths: RunPaths) -> None:
    """Remove what ``step`` wrote and its markers, so that it is redone from scratch."""
    if step.outputs is not None:
        remove(*step.outputs(config, paths))
    remove(paths.step_marker(step.name), started_path(paths, step.name))


def steps_from(steps: Sequence[Step[C]], name: str) -> list[Step[C]]:
    """``name`` and every step after it (what ``--force NAME`` redoes); ``all``: every step."""
    names = [s.name for s in steps]
    if name == "all":
        return list(steps)
    if name not in names:
        raise StepError(f"--force {name!r}: unknown step; choose one of {', '.join(names)} (or all)")
    return list(steps[names.index(name) :])


def check_until(steps: Sequence[Step[C]], until: str | None) -> None:
    names = [s.name for s in steps]
    if until is not None and until not in names:
        raise StepError(f"--until {until!r}: unknown step; choose one of {', '.join(names)}")


# --- the runner ---------------------------------------------------------------------------------------------
def run_steps(
    steps: Sequence[Step[C]],
    config: C,
    paths: RunPaths,
    ctx: Context,
    *,
    force: Iterable[str] = (),
    until: str | None = None,
    echo: Printer | None = None,
    hashes: Mapping[str, str] | None = None,
) -> list[StepResult]:
    """Run ``steps`` in order, skipping the done ones; returns what each step did.

    ``force``: steps to redo together with every step after them; ``until``: stop after this step; ``echo``:
    one line per step (e.g. ``print``; rank 0 only); ``hashes``: the steps' hashes when the caller already
    computed them (``step_hashes``)."""
    check_steps(steps)
    check_until(steps, until)
    redo: dict[str, Step[C]] = {}
    for name in force:
        redo.update({s.name: s for s in steps_from(steps, name)})
    say = echo if (echo is not None and ctx.is_main) else (lambda _line: None)
    digests = dict(hashes) if hashes is not None else step_hashes(steps, config)
    if ctx.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        for step in redo.values():
            clear_step(step, config, paths)
    distributed.barrier(ctx)
    results: list[StepResult] = []
    for step in steps:
        digest = digests[step.name]
        if step_done(paths, step.name, digest):
            results.append(StepResult(step.name, "skipped", 0.0, digest))
            say(f"[{step.name}] done before (hash {digest}), skipped")
        else:
            results.append(_run_one(step, config, paths, ctx, digest, say))
        if step.name == until:
            break
    return results


def _run_one(
    step: Step[C], config: C, paths: RunPaths, ctx: Context, digest: str, say: Printer
) -> StepResult:
    start, cpu_start = time.perf_counter(), time.process_time()
    if ctx.is_main:
        previous = previous_hash(paths, step.name)
        if step.clear_on_change and previous is not None and previous != digest:
            clear_step(step, config, paths)
        write_json_atomic(started_path(paths, step.name), {"step": step.name, "hash": digest})
    distributed.barrier(ctx)
    say(f"[{step.name}] running ...")
    step.run(config, paths, ctx)
    distributed.barrier(ctx)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if ctx.is_main:
        marker = {
            "step": step.name,
            "hash": digest,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 3),
        }
        write_json_atomic(paths.step_marker(step.name), marker)
        remove(started_path(paths, step.name))
    distributed.barrier(ctx)
    say(f"[{step.name}] done in {seconds:.1f} s")
    return StepResult(step.name, "ran", seconds, digest)
