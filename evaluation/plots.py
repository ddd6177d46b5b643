"""The figures: accuracy vs round, accuracy vs α, global vs local coefficients (PNG, matplotlib Agg).

Each plot is drawn from results.json's summary and cells only, so plots can be
redrawn from a finished run without touching the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ifedicl.evaluation.report import alpha_key
from ifedicl.evaluation.settings import METHOD_LABELS, METHODS

FLAT = ("zero_shot", "few_shot_icl", "local_icl", "i2cl_central", "local_calibration")
COEFF_NAMES = ("λ attn", "β attn", "λ mlp", "β mlp")  # [l, block, (λ, β)] flattened in this order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _save(fig, path: Path) -> Path:
    """Write one figure as PNG and free it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def accuracy_vs_round(summary: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    paths = []
    for task, per_alpha in summary.items():
        for a, by_method in per_alpha.items():
            fig, ax = plt.subplots(figsize=(6, 4))
            last = 1
            for m in ("ifedicl", "fedavg_lora"):
                if m in by_method:
                    per = by_method[m]["per_round"]
                    x = [p["round"] for p in per]
                    y = np.array([p["accuracy_mean"] for p in per]) * 100
                    err = np.array([p["accuracy_std"] for p in per]) * 100
                    ax.plot(x, y, marker="o", label=METHOD_LABELS[m])
                    ax.fill_between(x, y - err, y + err, alpha=0.2)
                    last = max(last, x[-1])
            for i, m in enumerate(FLAT):
                if m in by_method:
                    ax.axhline(
                        100 * by_method[m]["accuracy_mean"],
                        color=f"C{i + 2}",
                        linestyle=(0, (4, 1 + i)),
                        linewidth=1,
                        label=METHOD_LABELS[m],
                    )
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set(xlabel="round", ylabel="accuracy (%)", title=f"{task}, α={a}", xlim=(0, last))
            ax.legend(fontsize=7)
            paths.append(_save(fig, out_dir / f"accuracy_vs_round_{_safe(task)}_a{a}.png"))
    return paths


def accuracy_vs_client_cpu(summary: dict, out_dir: Path) -> list[Path]:
    """IFed-ICL and FedAvg-LoRA: accuracy after each round against the client CPU seconds spent by then (mean
    per client): every round is a budget, so one run draws the whole curve. The recipe's targets are drawn in:
    centralized I2CL's accuracy (a level) and half of FedAvg-LoRA's whole run (a budget)."""
    plt = _pyplot()
    paths = []
    for task, per_alpha in summary.items():
        for a, by_method in per_alpha.items():
            curves = {
                m: [p for p in by_method[m]["per_round"] if "client_cpu_seconds_mean" in p]
                for m in ("ifedicl", "fedavg_lora")
                if m in by_method
            }
            if not any(curves.values()):
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for m, per in curves.items():
                x = [p["client_cpu_seconds_mean"] for p in per]
                ax.plot(x, [100 * p["accuracy_mean"] for p in per], marker="o", label=METHOD_LABELS[m])
            if "i2cl_central" in by_method:
                level = 100 * by_method["i2cl_central"]["accuracy_mean"]
                ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=METHOD_LABELS["i2cl_central"])
            if curves.get("fedavg_lora"):
                half = curves["fedavg_lora"][-1]["client_cpu_seconds_mean"] / 2
                ax.axvline(half, color="gray", linestyle=":", linewidth=1, label="½ FedAvg-LoRA's client CPU")
            ax.set(xlabel="client CPU seconds (mean per client)", ylabel="accuracy (%)", title=f"{task}, α={a}")
            ax.legend(fontsize=7)
            paths.append(_save(fig, out_dir / f"accuracy_vs_client_cpu_{_safe(task)}_a{a}.png"))
    return paths


def accuracy_vs_alpha(summary: dict, alphas: list[float], out_dir: Path) -> list[Path]:
    """Only meaningful with several α: how each method degrades as the split gets more skewed."""
    if len(alphas) < 2:
        return []
    plt = _pyplot()
    paths = []
    xs = sorted(alphas)
    for task, per_alpha in summary.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in METHODS:
            ys = [per_alpha[alpha_key(a)].get(m, {}).get("accuracy_mean", np.nan) * 100 for a in xs]
            if not all(np.isnan(ys)):
                ax.plot(xs, ys, marker="o", label=METHOD_LABELS[m])
        ax.set(xscale="log", xlabel="Dirichlet α (smaller = more skewed)", ylabel="accuracy (%)", title=task)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"accuracy_vs_alpha_{_safe(task)}.png"))
    return paths


def global_vs_local_coefficients(cells: list[dict], out_dir: Path) -> list[Path]:
    """Per layer, the federated Λ next to every client's locally calibrated Λ (first seed)."""
    plt = _pyplot()
    paths = []
    for g in (c for c in cells if c["method"] == "ifedicl"):
        local = next(
            (
                c
                for c in cells
                if c["method"] == "local_calibration"
                and (c["task"], c["alpha"], c["seed"]) == (g["task"], g["alpha"], g["seed"])
            ),
            None,
        )
        if local is None or g["seed"] != min(c["seed"] for c in cells if c["method"] == "ifedicl"):
            continue
        glob = np.asarray(g["coefficients"]).reshape(-1, 4)  # [L, (λa, βa, λm, βm)]
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        layers = np.arange(glob.shape[0])
        for j, ax in enumerate(axes):
            for k, coeffs in enumerate(local["coefficients_per_client"]):
                ax.plot(
                    layers,
                    np.asarray(coeffs).reshape(-1, 4)[:, j],
                    color="gray",
                    alpha=0.5,
                    linewidth=1,
                    label="local (per client)" if k == 0 else None,
                )
            ax.plot(layers, glob[:, j], color="C3", marker="o", label="global (IFed-ICL)")
            ax.set(title=COEFF_NAMES[j], xlabel="layer")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{g['task']}, α={g['alpha']:g}, seed {g['seed']}")
        paths.append(_save(fig, out_dir / f"coefficients_{_safe(g['task'])}_a{g['alpha']:g}.png"))
    return paths


def write_plots(results: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    return (
        accuracy_vs_round(results["summary"], out_dir)
        + accuracy_vs_client_cpu(results["summary"], out_dir)
        + accuracy_vs_alpha(results["summary"], results["settings"]["alphas"], out_dir)
        + global_vs_local_coefficients(results["cells"], out_dir)
    )
