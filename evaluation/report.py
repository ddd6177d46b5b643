"""results.json (every number with its settings, model id and code version) and results.md.

results.md has the paper's table shapes: Table 1 accuracy (and macro-F1) per dataset
and method, Table 2 communication (IFed-ICL vs FedAvg-LoRA, bytes per client per
round and the ratio), Table 3 client compute time, plus the global-vs-local
coefficients comparison and accuracy after every round. The markdown is rendered
only from the JSON summary, so the two always agree.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

from ifedicl.evaluation.settings import METHOD_LABELS, METHODS, SPLIT_FREE, EvalSettings
from ifedicl.evaluation.statistics import mean_std

COMM_FIELDS = (
    "stage1_up_per_client",
    "stage1_down_per_client",
    "round_up_per_client",
    "round_down_per_client",
    "total_up",
    "total_down",
)


# Results, not code: a checkout whose only changes are under these folders still names its commit cleanly (a
# report's new cells are rendered before they are committed, and its summary named the commit "-dirty").
RESULT_FOLDERS = ("docs",)


def describe_checkout(directory: Path) -> str | None:
    """``git describe`` of the checkout holding ``directory``, ``-dirty`` where a tracked file outside
    :data:`RESULT_FOLDERS` differs from the commit; None outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)

    try:
        described = git("describe", "--always", "--tags")
        if described.returncode != 0 or not described.stdout.strip():
            return None
        results = [f":(top,exclude){folder}" for folder in RESULT_FOLDERS]
        code_changed = git("diff", "--quiet", "HEAD", "--", ":(top)", *results).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() + ("-dirty" if code_changed else "")


@functools.cache
def code_version() -> str:
    """:func:`describe_checkout` of the checkout this code runs from, else the installed package version.

    Read once per process: the code that runs is what was imported at start, whatever the
    checkout holds later (editing files during a long report does not relabel its cells)."""
    described = describe_checkout(Path(__file__).resolve().parent)
    if described is not None:
        return described
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ifedicl {version('ifedicl')}"
    except PackageNotFoundError:
        return "unknown"


def alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _summarize_method(records: list[dict]) -> dict:
    acc_mean, acc_std = mean_std([r["accuracy"] for r in records])
    f1_mean, f1_std = mean_std([r["macro_f1"] for r in records])
    out = {
        "accuracy_mean": acc_mean,
        "accuracy_std": acc_std,
        "macro_f1_mean": f1_mean,
        "macro_f1_std": f1_std,
        "seeds": sorted(r["seed"] for r in records),
        "client_seconds_mean": mean_std([r["client_seconds"] for r in records])[0],
        "client_cpu_seconds_mean": mean_std([r.get("client_cpu_seconds", 0.0) for r in records])[0],
        "comm": {k: float(np.mean([r["comm"][k] for r in records])) for k in COMM_FIELDS},
    }
    if "client_accuracy_std" in records[0]:
        out["client_accuracy_std_mean"] = mean_std([r["client_accuracy_std"] for r in records])[0]
    if "per_round" in records[0]:
        rounds = sorted({p["round"] for r in records for p in r["per_round"]})
        out["per_round"] = []
        for rnd in rounds:
            accs = [p["accuracy"] for r in records for p in r["per_round"] if p["round"] == rnd]
            f1s = [p["macro_f1"] for r in records for p in r["per_round"] if p["round"] == rnd]
            m, s = mean_std(accs)
            row = {"round": rnd, "accuracy_mean": m, "accuracy_std": s, "macro_f1_mean": mean_std(f1s)[0]}
            cpu = [p.get("client_cpu_seconds") for r in records for p in r["per_round"] if p["round"] == rnd]
            if cpu and all(c is not None for c in cpu):  # cells before it was recorded per round have none
                row["client_cpu_seconds_mean"] = mean_std(cpu)[0]
            out["per_round"].append(row)
    return out


def summarize(records: list[dict], settings: EvalSettings) -> dict:
    """``{task: {alpha: {method: summary}}}``; split-free methods appear under every α."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        grouped[(r["task"], r["method"], r["alpha"])].append(r)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    summary: dict = {}
    for task in tasks:
        summary[task] = {}
        for alpha in settings.alphas:
            row = {}
            for method in METHODS:
                key = (task, method, None if method in SPLIT_FREE else alpha)
                if grouped.get(key):
                    row[method] = _summarize_method(grouped[key])
            summary[task][alpha_key(alpha)] = row
    return summary


def pct(mean: float, std: float) -> str:
    """The one place accuracy is formatted, used by results.md and by the test that checks it."""
    return "–" if np.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def kb(n: float) -> str:
    return f"{n / 1024:,.2f} KB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _objective_line(settings: dict) -> str:
    objective = settings.get("objective")
    if objective:
        return f"{objective} cross-entropy for every trainable method"
    return "each method's own (full-vocab for I2CL, local-only and IFed-ICL; label-only for FedAvg-LoRA)"


def render_markdown(results: dict) -> str:
    summary, settings = results["summary"], results["settings"]
    methods = [m for m in METHODS if m in settings["methods"]]
    rows_of = [(task, a, by_method) for task, per_alpha in summary.items() for a, by_method in per_alpha.items()]
    lines = [
        "# IFed-ICL evaluation",
        "",
        f"Model `{results['model_id']}`, code `{results['code_version']}`, {results['created']}.  ",
        f"{settings['clients']} clients, Dirichlet α ∈ {settings['alphas']}, {settings['rounds']} rounds × "
        f"{settings['local_epochs']} local epoch(s), seeds {settings['seeds']}, test {settings['test_size']} "
        f"(class-balanced), {settings['shots']}-shot ICL, LoRA r={settings['lora_rank']}.  ",
        f"Training objective: {_objective_line(settings)}.  ",
        "Accuracy and macro-F1 in %, mean ± std over seeds. Local methods: mean over clients.",
        "",
        "## Table 1: accuracy (%)",
        "",
    ]
    header = ["dataset", "α"] + [METHOD_LABELS[m] for m in methods]

    def metric_rows(metric: str) -> list[list[str]]:
        out = []
        for task, a, by_method in rows_of:
            cells = [
                pct(by_method[m][f"{metric}_mean"], by_method[m][f"{metric}_std"]) if m in by_method else "–"
                for m in methods
            ]
            out.append([task, a, *cells])
        return out

    lines += _table(header, metric_rows("accuracy"))
    lines += ["", "## Table 1b: macro-F1 (%)", ""] + _table(header, metric_rows("macro_f1"))

    lines += ["", "## Table 2: communication per client (measured bytes)", ""]
    comm_rows = []
    for task, a, by_method in rows_of:
        ifed, lora = by_method.get("ifedicl"), by_method.get("fedavg_lora")
        for m, s in (("ifedicl", ifed), ("fedavg_lora", lora)):
            if s is None:
                continue
            c = s["comm"]
            ratio = "–"
            if ifed and lora and m == "fedavg_lora":
                ratio = f"{lora['comm']['round_up_per_client'] / ifed['comm']['round_up_per_client']:,.1f}×"
            comm_rows.append(
                [
                    task,
                    a,
                    METHOD_LABELS[m],
                    f"{c['stage1_up_per_client']:.0f}",
                    f"{c['round_up_per_client']:.0f} ({kb(c['round_up_per_client'])})",
                    f"{c['round_down_per_client']:.0f}",
                    f"{c['total_up']:.0f}",
                    f"{c['total_down']:.0f}",
                    ratio,
                ]
            )
    lines += _table(
        [
            "dataset",
            "α",
            "method",
            "stage-1 up B (once)",
            "up B / round",
            "down B / round",
            "total up B (all clients)",
            "total down B",
            "LoRA ÷ IFed-ICL per round",
        ],
        comm_rows,
    )

    lines += ["", "## Table 3: client compute, seconds per client (wall / CPU)", ""]
    compute_rows = []
    for task, a, by_method in rows_of:
        compute_rows.append(
            [task, a]
            + [
                f"{by_method[m]['client_seconds_mean']:.1f} / {by_method[m]['client_cpu_seconds_mean']:.1f}"
                if m in by_method
                else "–"
                for m in methods
            ]
        )
    lines += _table(["dataset", "α"] + [METHOD_LABELS[m] for m in methods], compute_rows)
    lines += [
        "",
        "IFed-ICL and FedAvg-LoRA: measured inside each Ray client actor (wall and process CPU seconds of every "
        "request it served), summed per client, mean over clients; both run on the same actors. Local-only: mean "
        "per client, in process. I2CL central: the single party. Prompt-only methods train nothing (0).",
    ]

    lines += ["", "## Global vs local coefficients (paper Fig. 2)", ""]
    gl_rows = []
    for task, a, by_method in rows_of:
        ifed, local = by_method.get("ifedicl"), by_method.get("local_calibration")
        if ifed and local:
            gap = 100 * (ifed["accuracy_mean"] - local["accuracy_mean"])
            gl_rows.append(
                [
                    task,
                    a,
                    pct(ifed["accuracy_mean"], ifed["accuracy_std"]),
                    pct(local["accuracy_mean"], local["accuracy_std"]),
                    f"{100 * local.get('client_accuracy_std_mean', float('nan')):.1f}",
                    f"{gap:+.1f}",
                ]
            )
    lines += _table(["dataset", "α", "global (IFed-ICL)", "local mean", "client spread (std)", "gap (points)"], gl_rows)

    lines += ["", "## Accuracy after every scored round (%)", ""]
    curves = [
        (task, a, m, {p["round"]: p["accuracy_mean"] for p in by_method[m]["per_round"]})
        for task, a, by_method in rows_of
        for m in ("ifedicl", "fedavg_lora")
        if m in by_method
    ]
    rounds = sorted({r for *_, curve in curves for r in curve})
    round_rows = [
        [task, a, METHOD_LABELS[m]] + [f"{100 * curve[r]:.1f}" if r in curve else "" for r in rounds]
        for task, a, m, curve in curves
    ]
    lines += _table(["dataset", "α", "method"] + [f"r{r}" for r in rounds], round_rows)
    return "\n".join(lines) + "\n"


def write_results(records: list[dict], settings: EvalSettings, model_id: str, out_dir: str | Path, stats: dict) -> dict:
    out_dir = Path(out_dir)
    results = {
        "model_id": model_id,
        "code_version": code_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        "run": stats,
        "summary": summarize(records, settings),
        "cells": records,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out_dir / "results.md").write_text(render_markdown(results))
    return results
