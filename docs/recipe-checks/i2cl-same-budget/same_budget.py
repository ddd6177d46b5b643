"""Centralized I2CL at the budget issue 30 reads IFed-ICL at: half of FedAvg-LoRA's client CPU.

Why: the first target sets IFed-ICL within half of LoRA's client CPU against I2CL's whole recipe (3 epochs).
Whether the gap left there is the federation's or the budget's is a measurement: centralized I2CL (all the data
in one place, its own AdamW schedule) trained for fewer epochs, on the same splits and test sample. One and a half
epochs cost less than half of FedAvg-LoRA's CPU summed over the clients, two cost more: together they bracket I2CL
at the budget. Compute is compared as the sum over all parties (one central party does every client's work).

    ifedicl report --out <dir> --models smollm2-135m --tasks subj,emotion,agnews,sst2 --methods i2cl_central \\
        --rounds 6   # 6 × ¼ = 1.5 epochs (the harness trains I2CL for rounds × local epochs); 4: one, 8: two
    python docs/recipe-checks/i2cl-same-budget/same_budget.py docs/report/smollm2-135m/label-only \\
        docs/recipe-checks/i2cl-same-budget/{one-epoch,one-and-a-half-epochs,two-epochs} \\
        --plot docs/recipe-checks/i2cl-same-budget/accuracy_vs_cpu.png > docs/recipe-checks/i2cl-same-budget/output.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ifedicl.evaluation.comparison import RECIPE_TASKS, mean_curve, round_budget

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cell_folder import cells, mean_and_error  # noqa: E402  (docs/recipe-checks/cell_folder.py)


def at_same_cpu(ifedicl: list[dict], cpu: float, clients: int) -> tuple[int, float]:
    """IFed-ICL's last scored round whose client CPU summed over the clients (mean over seeds) is at most ``cpu``,
    and its mean accuracy there (%)."""
    within = [(rnd, accuracy) for rnd, accuracy, seconds in mean_curve(ifedicl) if rnd > 0 and clients * seconds <= cpu]
    last, accuracy = within[-1] if within else (0, mean_curve(ifedicl)[0][1])
    return last, 100 * accuracy


def at_budget(points: list[tuple[float, float]], budget: float) -> float | None:
    """Accuracy at ``budget`` CPU seconds, linear between the two runs (cpu, accuracy) whose CPU brackets it: the
    estimate between two measurements, None where no two runs bracket the budget."""
    below, above = [p for p in points if p[0] <= budget], [p for p in points if p[0] > budget]
    if not below or not above:
        return None
    (cpu_below, low), (cpu_above, high) = max(below), min(above)
    return low + (high - low) * (budget - cpu_below) / (cpu_above - cpu_below)


def plot(path: Path, curves: dict[str, dict]) -> None:
    """One panel per task: IFed-ICL's and FedAvg-LoRA's mean accuracy after each scored round and centralized I2CL's
    after each epoch count, against the CPU seconds all parties spent by then; the dotted line is half of LoRA's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
    for ax, (task, curve) in zip(axes[0], curves.items()):
        for name, points in curve["lines"].items():
            x, y = zip(*points)
            ax.plot(x, y, marker="o", markersize=3, label=name)
        x, y = zip(*sorted(curve["i2cl"].values()))
        ax.plot(x, y, marker="s", linestyle="--", color="black", label="I2CL central, each epoch count")
        ax.axvline(curve["half_of_lora"], linestyle=":", color="grey", label="½ FedAvg-LoRA's client CPU")
        ax.set_title(f"{task} (seeds {curve['seeds']})")
        ax.set_xlabel("client CPU seconds, all parties")
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="the report's model/objective folder (IFed-ICL, LoRA, I2CL)")
    parser.add_argument("shorter", type=Path, nargs="+", help="folders of I2CL cells trained for fewer epochs")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to compare on (default: every common one)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw accuracy against all parties' CPU (PNG)")
    args = parser.parse_args()
    curves: dict[str, dict] = {}
    names = ["3 epochs (the report's)", *(folder.name for folder in args.shorter)]
    by_seed: dict[str, dict[int, list[float]]] = {name: {} for name in names}  # IFed-ICL − I2CL, each task's
    same_cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # (IFed-ICL, I2CL) per task
    for task in RECIPE_TASKS:
        ifedicl, lora = cells(args.report, "ifedicl", task), cells(args.report, "fedavg_lora", task)
        central = {"3 epochs (the report's)": cells(args.report, "i2cl_central", task)}
        central.update({folder.name: cells(folder, "i2cl_central", task) for folder in args.shorter})
        seeds = sorted(set(ifedicl) & set(lora) & set.intersection(*(set(c) for c in central.values())))
        if args.seeds is not None:
            seeds = [s for s in seeds if str(s) in args.seeds.split(",")]
        if not seeds:
            continue
        half = round_budget([ifedicl[s] for s in seeds], [lora[s] for s in seeds])["half_lora_cpu"]
        at_half = {s: next(p for p in ifedicl[s]["per_round"] if p["round"] == half["round"]) for s in seeds}
        budget = args.clients * np.mean([lora[s]["client_cpu_seconds"] for s in seeds]) / 2  # all clients' CPU
        ifedicl_accuracy = [100 * at_half[s]["accuracy"] for s in seeds]
        cpu = {name: float(np.mean([c[s]["client_cpu_seconds"] for s in seeds])) for name, c in central.items()}
        cpu["ifedicl"] = float(args.clients * np.mean([at_half[s]["client_cpu_seconds"] for s in seeds]))
        row = {
            "task": task,
            "seeds": seeds,
            "round": half["round"],
            "ifedicl": ifedicl_accuracy,
            "i2cl": {name: [100 * c[s]["accuracy"] for s in seeds] for name, c in central.items()},
            "cpu_s_all_parties": {"half_of_lora": round(float(budget), 1), **{k: round(v, 1) for k, v in cpu.items()}},
        }
        row["ifedicl_at_i2cl_cpu"] = {name: at_same_cpu([ifedicl[s] for s in seeds], cpu[name], args.clients)
                                      for name in central}  # fmt: skip
        curves[task] = {
            "seeds": seeds,
            "half_of_lora": float(budget),
            "lines": {label: [(args.clients * seconds, 100 * accuracy) for _, accuracy, seconds in
                              mean_curve([by_seed[s] for s in seeds])]
                      for label, by_seed in (("IFed-ICL", ifedicl), ("FedAvg-LoRA", lora))},
            "i2cl": {name: (cpu[name], float(np.mean(accuracy))) for name, accuracy in row["i2cl"].items()},
        }  # fmt: skip
        for name, accuracy in row["i2cl"].items():
            same_cpu[name].append((row["ifedicl_at_i2cl_cpu"][name][1], float(np.mean(accuracy))))
            for seed, ours, theirs in zip(seeds, ifedicl_accuracy, accuracy):
                by_seed[name].setdefault(seed, []).append(ours - theirs)
        print(json.dumps(row))
    for name, seeds in by_seed.items():  # the four tasks' mean gap per seed, then its mean ± s.e. over seeds
        means = [float(np.mean(gaps)) for gaps in seeds.values()]
        print(f"IFed-ICL within half of LoRA's client CPU against I2CL, {name}: {mean_and_error(means)} "
              f"(s.e. over {len(means)} seeds of the tasks' mean)")  # fmt: skip
    for name, pairs in same_cpu.items():
        ours, theirs = np.mean(pairs, axis=0)
        print(f"At I2CL's ({name}) client CPU: IFed-ICL {ours:.2f}, I2CL {theirs:.2f} (mean of {len(pairs)} tasks)")
    central_at_budget = {t: at_budget(list(c["i2cl"].values()), c["half_of_lora"]) for t, c in curves.items()}
    if curves and None not in central_at_budget.values():
        print(f"Centralized I2CL at half of LoRA's client CPU, between the runs that bracket it: "
              f"{np.mean(list(central_at_budget.values())):.2f} ("
              + ", ".join(f"{t} {a:.1f}" for t, a in central_at_budget.items()) + ")")  # fmt: skip
    if args.plot is not None:
        plot(args.plot, curves)


if __name__ == "__main__":
    main()
