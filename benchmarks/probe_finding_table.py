"""Print the probe table of a run (markdown): variants × methods × GridPG 2×2 / 3×3 and energy pointing game,
mean [95% bootstrap CI], and each variant's paired mean difference Δ to the CE-linear probe (\\* = Wilcoxon
signed-rank test significant after Holm over the variants, p < 0.05; the CIs of Δ: probe_vs_baseline.csv).

    PYTHONPATH=src python benchmarks/probe_finding_table.py runs/probe-finding
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

import evidrift  # noqa: F401
from evidrift.core.paths import RunPaths
from evidrift.studies.probe.stats import versus_baseline
from evidrift.studies.probe.study import BASELINE

METRICS = ("gridpg@2", "gridpg@3", "energy_pointing_game")


def main(run: Path) -> None:
    summary = pd.read_csv(RunPaths.at(run).probe_summary)
    baseline_file = RunPaths.at(run).probe_baseline
    if baseline_file.is_file():
        versus = pd.read_csv(baseline_file)
    else:
        versus = versus_baseline(pd.read_parquet(RunPaths.at(run).probe_table), BASELINE, n_boot=1000)
        versus.to_csv(baseline_file, index=False)
    accuracy = summary[summary["metric"] == "correct"].set_index("variant")
    print("| variant | accuracy |")
    print("|---|---|")
    for variant, row in accuracy.iterrows():
        print(f"| {variant} | {row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] |")
    pool = RunPaths.at(run).probe_pool
    if pool.is_file():
        print()
        frame = pd.read_csv(pool)
        print("| " + " | ".join(frame.columns) + " |")
        print("|" + "---|" * len(frame.columns))
        for _, row in frame.iterrows():
            print("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    print()
    print("| method | variant | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for method in [m for m in dict.fromkeys(summary["method"]) if m != "-"]:
        part = summary[summary["method"] == method]
        for variant in dict.fromkeys(part["variant"]):
            cells = []
            for metric in METRICS:
                hit = part[(part["variant"] == variant) & (part["metric"] == metric)]
                if hit.empty:
                    cells.append("n/a")
                    continue
                row = hit.iloc[0]
                text = f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
                diff = versus[
                    (versus["method"] == method)
                    & (versus["variant"] == variant)
                    & (versus["metric"] == metric)
                ]
                if len(diff):
                    d = diff.iloc[0]
                    star = "\\*" if bool(d["significant"]) else ""
                    text += f" Δ {d['mean_diff']:+.3f}{star}"
                cells.append(text)
            print(f"| {method} | {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
