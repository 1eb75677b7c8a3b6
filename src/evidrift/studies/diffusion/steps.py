"""A minimal step runner for the diffusion study, shaped like the lead's ``evidrift.core.steps`` (Step with
name, run(config, paths, ctx), reads, config keys, outputs) until that lands; then the study's steps move
onto it unchanged.

A step's hash covers the config keys it names (dotted paths into the resolved ``DiffusionConfig``) and the
hashes of the steps it reads. ``steps/{name}.json`` (``RunPaths.step_marker``) is written last with that
hash; a step whose marker holds the current hash and whose outputs exist is skipped. ``force`` (step names
or ``all``) redoes a step and every step that reads it, directly or not; ``until`` stops after that step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evidrift.core.errors import EvidriftError
from evidrift.core.io import config_hash, write_json_atomic
from evidrift.core.paths import RunPaths
from evidrift.studies.diffusion.config import DiffusionConfig, config_dict


class StepError(EvidriftError, ValueError):
    """An unknown step name in ``force``/``until``; the message lists the steps."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[DiffusionConfig, RunPaths, dict[str, Any]], None]
    reads: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass
class StepLog:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _lookup(resolved: dict[str, Any], dotted: str) -> Any:
    value: Any = resolved
    for part in dotted.split("."):
        value = value[part]
    return value


def step_hashes(steps: Sequence[Step], config: DiffusionConfig) -> dict[str, str]:
    resolved = config_dict(config)
    hashes: dict[str, str] = {}
    for step in steps:
        identity = {
            "step": step.name,
            "config": {key: _lookup(resolved, key) for key in step.config},
            "reads": {name: hashes[name] for name in step.reads},
        }
        hashes[step.name] = config_hash(identity)
    return hashes


def _done(paths: RunPaths, step: Step, digest: str) -> bool:
    marker = paths.step_marker(step.name)
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("hash")
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == digest and all((paths.root / out).exists() for out in step.outputs)


def run_steps(
    steps: Sequence[Step],
    config: DiffusionConfig,
    paths: RunPaths,
    force: Sequence[str] = (),
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> StepLog:
    names = [s.name for s in steps]
    unknown = [n for n in [*force, *([until] if until else [])] if n not in names and n != "all"]
    if unknown:
        raise StepError(f"unknown steps {unknown}; the diffusion study's steps are {names}")
    forced = set(names) if "all" in force else set(force)
    for step in steps:  # a forced step forces whatever reads it
        if any(r in forced for r in step.reads):
            forced.add(step.name)
    hashes = step_hashes(steps, config)
    context: dict[str, Any] = {}
    record = StepLog()
    for step in steps:
        if step.name not in forced and _done(paths, step, hashes[step.name]):
            record.skipped.append(step.name)
            log(f"[diffusion] {step.name}: done (same config), skipped")
        else:
            start = time.perf_counter()
            cpu = time.process_time()
            log(f"[diffusion] {step.name} ...")
            step.run(config, paths, context)
            seconds = time.perf_counter() - start
            record.ran.append(step.name)
            record.seconds[step.name] = seconds
            write_json_atomic(
                paths.step_marker(step.name),
                {"hash": hashes[step.name], "seconds": seconds, "cpu_seconds": time.process_time() - cpu},
            )
            log(f"[diffusion] {step.name}: {seconds:.1f} s")
        if until is not None and step.name == until:
            break
    return record


def output_path(paths: RunPaths, relative: str) -> Path:
    return paths.root / relative
