"""The report's IFed-ICL cells against the same cells under other round settings, seed by seed (issue 30).

Why paired by seed and read at the report's own rounds: a seed fixes the split, the windows and the test sample,
and the server-side settings compared here (``--step-ridge``, ``--no-remember-undone``) change no client's work,
so round k costs the same client CPU under both; reading both at the round the report's cells put within half of
FedAvg-LoRA's client CPU keeps the budget where issue 30's table reads it, whatever load each run shared the
machine with. Prints one JSON row per task and seed, then the targets' summary over the seeds every task has.

    python docs/recipe-checks/step-defaults/compare.py docs/report/smollm2-135m/label-only <folder> [<folder> ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ifedicl.evaluation.comparison import RECIPE_TASKS, round_budget

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cell_folder import cells, mean_and_error  # noqa: E402  (docs/recipe-checks/cell_folder.py)


def at_round(cell: dict, rnd: int) -> float | None:
    """A cell's accuracy (%) after round ``rnd``, None when that round was not scored."""
    found = [p["accuracy"] for p in cell["per_round"] if p["round"] == rnd]
    return round(100 * found[0], 1) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="the report's model/objective folder (IFed-ICL, LoRA, I2CL)")
    parser.add_argument("candidates", type=Path, nargs="+", help="folders (one per task or one for all) of new cells")
    args = parser.parse_args()
    rows = []
    for task in RECIPE_TASKS:
        old, lora, i2cl = (cells(args.report, method, task) for method in ("ifedicl", "fedavg_lora", "i2cl_central"))
        new = {seed: cell for folder in args.candidates for seed, cell in cells(folder, "ifedicl", task).items()}
        seeds = sorted(set(old) & set(new) & set(lora) & set(i2cl))
        if not seeds:
            continue
        # the report's half-budget round on every seed it has (issue 30's table), not only the common ones
        half = round_budget(list(old.values()), [lora[s] for s in old])["half_lora_cpu"]["round"]
        last = max(p["round"] for p in old[seeds[0]]["per_round"])
        for seed in seeds:
            row = {"task": task, "seed": seed, "half_round": half, "lora": round(100 * lora[seed]["accuracy"], 1),
                   "i2cl": round(100 * i2cl[seed]["accuracy"], 1)}  # fmt: skip
            for name, rnd in (("half", half), ("last", last)):
                row[name] = {"report": at_round(old[seed], rnd), "new": at_round(new[seed], rnd)}
            row["new_by_round"] = {p["round"]: round(100 * p["accuracy"], 1) for p in new[seed]["per_round"]}
            rows.append(row)
            print(json.dumps(row))
    common = set.intersection(*({r["seed"] for r in rows if r["task"] == t} for t in {r["task"] for r in rows}))
    tasks = sorted({r["task"] for r in rows}, key=RECIPE_TASKS.index)
    chosen = [r for r in rows if r["seed"] in common]
    print(f"seeds every task has: {sorted(common)}; tasks: {tasks}")
    for reading in ("half", "last"):
        for which in ("report", "new"):
            # the tasks' mean per seed, against I2CL's whole recipe; then each task's mean against LoRA's
            gaps = [np.mean([r[reading][which] - r["i2cl"] for r in chosen if r["seed"] == s]) for s in sorted(common)]
            means = {t: np.mean([r[reading][which] for r in chosen if r["task"] == t]) for t in tasks}
            above = [t for t in tasks if means[t] > np.mean([r["lora"] for r in chosen if r["task"] == t])]
            print(f"{reading:>4} {which:>6}: mean {np.mean(list(means.values())):.2f}, against I2CL "
                  f"{mean_and_error(gaps)}; above LoRA on {len(above)} of {len(tasks)} ({', '.join(above)}); "
                  + ", ".join(f"{t} {m:.1f}" for t, m in means.items()))  # fmt: skip
        paired = [r[reading]["new"] - r[reading]["report"] for r in chosen]
        print(f"{reading:>4} new − report, over {len(paired)} task-seeds: {mean_and_error(paired)}")


if __name__ == "__main__":
    main()
