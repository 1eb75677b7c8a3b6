"""Phantom generation speed at 256 px: images per second for rendering alone, rendering + PNG writing in one
process, and the full ``generate_phantom_set`` with its process pool, measured side by side in one run.

    .venv/bin/python benchmarks/phantoms.py [--n 400] [--size 256]

Aim (ARCHITECTURE §9, issue 2): >= 100 images/s at 256 px on 2 cores for the full set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import evidrift  # noqa: F401  (first, as everywhere)
from evidrift.data.phantom import CLASSES, generate_phantom_set, render_phantom, to_png_bytes


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images per measurement")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args()
    n, size = args.n, args.size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    render_phantom("normal", np.random.default_rng(0), size)  # warm caches
    start = time.perf_counter()
    for i in range(n):
        render_phantom(CLASSES[i % 5], np.random.default_rng(i), size)
    render_only = _rate(n, time.perf_counter() - start)

    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(n):
        image, mask = render_phantom(CLASSES[i % 5], np.random.default_rng(i), size)
        to_png_bytes(image)
        to_png_bytes(mask)
    render_png = _rate(n, time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu_start) / n * 1000.0

    out = Path(tempfile.mkdtemp(prefix="evidrift-bench-"))
    try:
        start = time.perf_counter()
        generate_phantom_set(out / "one", n, size, seed=0, progress=False, workers=1)
        one_process = _rate(n, time.perf_counter() - start)
        start = time.perf_counter()
        generate_phantom_set(out / "pool", n, size, seed=0, progress=False)
        pooled = _rate(n, time.perf_counter() - start)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    print(f"phantoms at {size} px, {n} images, {cores} cores (1-min load average before: {load:.1f})")
    print(f"  render only (1 process)              {render_only:8.1f} images/s")
    print(f"  render + 2 PNG encodes (1 process)   {render_png:8.1f} images/s  ({cpu_ms:.1f} CPU ms/image)")
    print(f"  generate_phantom_set, 1 process      {one_process:8.1f} images/s")
    print(f"  generate_phantom_set, default pool   {pooled:8.1f} images/s  (x{pooled / one_process:.2f})")
    print(f"  target >= 100 images/s: {'met' if pooled >= 100 else 'NOT met'}")


if __name__ == "__main__":
    main()
