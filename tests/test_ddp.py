"""torchrun DDP on CPU (gloo, 2 processes): the real `torchrun -m evidrift train` entry point.

A linear head trained on cached features has no BatchNorm or dropout, so two processes with batch 4 each
(DistributedSampler: rank r takes every second index of the same permutation, gradients averaged) see
exactly the samples of the single-process batch of 8: the weights must agree to rounding.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import evidrift  # noqa: F401  (before timm)
from evidrift import models
from evidrift.artifacts import RunPaths, read_jsonl
from evidrift.config import load_config
from evidrift.train import train_study


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _study(folder: Path, weights: Path, batch_size: int) -> Path:
    study = {
        "data": {"phantom": {"n": 40, "size": 32}, "split": {"val": 0.2, "test": 0.2}},
        "models": [{"arch": "test_resnet", "image_size": 32, "weights": str(weights)}],
        "train": {
            "device": "cpu",
            "stage1": {"epochs": 2, "batch_size": batch_size, "cache_features": True, "lr": 0.01},
            "stage2": {"epochs": 1, "batch_size": batch_size, "max_steps_per_epoch": 2},
        },
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.timeout(120)
def test_torchrun_two_gloo_processes_match_single_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"
    save_file(
        {k: v.contiguous() for k, v in models.build_model("test_resnet", 2).state_dict().items()},
        str(weights),
    )
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    ddp_study = _study(tmp_path / "ddp", weights, batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    process = subprocess.Popen(
        [*command, "-m", "evidrift", "train", str(ddp_study), "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=110)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: no orphan keeps running
        _, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 110 s:\n{stderr[-4000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert result.returncode == 0, result.stderr[-4000:]

    single = load_config(_study(tmp_path / "single", weights, batch_size=8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_study(single, RunPaths.at(single.output.dir), stages=("1",), progress=False)
    finally:
        torch.set_num_threads(threads)

    ddp_paths = RunPaths.at(tmp_path / "ddp" / "run")
    a = load_file(str(ddp_paths.checkpoint("test_resnet", 1)))
    b = load_file(str(RunPaths.at(single.output.dir).checkpoint("test_resnet", 1)))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    assert ddp_paths.checkpoint("test_resnet", 2).is_file()  # stage 2: DDP over the whole model
    records = read_jsonl(ddp_paths.train_metrics("test_resnet"))
    assert [(r["stage"], r["epoch"]) for r in records] == [("1", 0), ("1", 1), ("2", 0)]  # rank 0 writes once
    single_records = read_jsonl(RunPaths.at(single.output.dir).train_metrics("test_resnet"))
    for mine, theirs in zip(records[:2], single_records, strict=True):
        assert mine["val_accuracy"] == pytest.approx(theirs["val_accuracy"])
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
