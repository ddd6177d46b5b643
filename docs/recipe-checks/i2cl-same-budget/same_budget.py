"""Centralized I2CL at the budget issue 30 reads IFed-ICL at: half of FedAvg-LoRA's client CPU.

Why: the first target sets IFed-ICL within half of LoRA's client CPU against I2CL's whole recipe (3 epochs).
Whether the gap left there is the federation's or the budget's is a measurement: centralized I2CL (all the data
in one place, its own AdamW schedule) trained for one epoch, which costs less than half of FedAvg-LoRA's CPU
summed over the clients, on the same splits and test sample. Compute is compared as the sum over all parties
(one central party does every client's work).

    ifedicl report --out <dir> --models smollm2-135m --tasks subj,emotion,agnews,sst2 --methods i2cl_central \\
        --rounds 4   # 4 × ¼ = one epoch: the harness trains I2CL for rounds × local epochs
    python docs/recipe-checks/i2cl-same-budget/same_budget.py docs/report/smollm2-135m/label-only \\
        <dir>/smollm2-135m/label-only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ifedicl.evaluation.comparison import RECIPE_TASKS, round_budget


def cells(folder: Path, method: str, task: str) -> dict[int, dict]:
    """{seed: cell} of one method and task in a report folder's cells/."""
    found = (json.loads(path.read_text()) for path in sorted((folder / "cells").glob(f"{method}__{task}__*.json")))
    return {cell["seed"]: cell for cell in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="the report's model/objective folder (IFed-ICL, LoRA, I2CL)")
    parser.add_argument("short", type=Path, help="the model/objective folder of the one-epoch I2CL cells")
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    gaps: dict[str, list[float]] = {"vs I2CL, 3 epochs": [], "vs I2CL, 1 epoch": []}
    for task in RECIPE_TASKS:
        ifedicl, lora = cells(args.report, "ifedicl", task), cells(args.report, "fedavg_lora", task)
        full, short = cells(args.report, "i2cl_central", task), cells(args.short, "i2cl_central", task)
        seeds = sorted(set(ifedicl) & set(lora) & set(full) & set(short))
        if not seeds:
            continue
        half = round_budget([ifedicl[s] for s in seeds], [lora[s] for s in seeds])["half_lora_cpu"]
        at_half = {s: next(p for p in ifedicl[s]["per_round"] if p["round"] == half["round"]) for s in seeds}
        budget = args.clients * np.mean([lora[s]["client_cpu_seconds"] for s in seeds]) / 2  # all clients' CPU
        row = {
            "task": task,
            "seeds": seeds,
            "round": half["round"],
            "ifedicl": [100 * at_half[s]["accuracy"] for s in seeds],
            "i2cl_3_epochs": [100 * full[s]["accuracy"] for s in seeds],
            "i2cl_1_epoch": [100 * short[s]["accuracy"] for s in seeds],
            "cpu_s_all_parties": {
                "half_of_lora": round(float(budget), 1),
                "ifedicl": round(float(args.clients * np.mean([at_half[s]["client_cpu_seconds"] for s in seeds])), 1),
                "i2cl_1_epoch": round(float(np.mean([short[s]["client_cpu_seconds"] for s in seeds])), 1),
            },
        }
        gaps["vs I2CL, 3 epochs"].append(np.mean(row["ifedicl"]) - np.mean(row["i2cl_3_epochs"]))
        gaps["vs I2CL, 1 epoch"].append(np.mean(row["ifedicl"]) - np.mean(row["i2cl_1_epoch"]))
        print(json.dumps(row))
    for name, values in gaps.items():
        print(f"IFed-ICL within half of LoRA's client CPU, {name}: {np.mean(values):+.2f} over {len(values)} tasks")


if __name__ == "__main__":
    main()
