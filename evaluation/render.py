"""The report's and the ablation's ``results.md``, rendered from the grid's ``results.json`` dict alone.

Pure functions of that dict (no files, no cells): :func:`render_report` for ``ifedicl report``,
:func:`render_ablation` for ``ifedicl ablate``, and the notes the report prints about what differs
from the paper. :func:`ifedicl.evaluation.grid.write_report` collects the cells and writes the files.
"""

from __future__ import annotations

import numpy as np

from ifedicl.evaluation.columns import column_label, safe_name
from ifedicl.evaluation.comparison import RECIPE_TASKS
from ifedicl.evaluation.report import _table
from ifedicl.evaluation.variants import REPORT_DEFAULTS

BFLOAT16_NOTE = (
    "Precision: the frozen model computes in bfloat16 (Λ, the LoRA adapters, the vector sums and the optimizers "
    "stay float32), about half the CPU seconds of float32, so the grid fits the CPU budget; every method shares it. "
    "In `docs/ablation` the `bfloat16 model` cells scored what float32 scored on SmolLM2 × Subj (seeds 0 and 1) "
    "and 1.5 points less on Emotion (seed 0: 44.0 vs 45.5, the same curve until the last round)."
)

RECIPE_NOTE = (
    "Rounds: IFed-ICL and FedAvg-LoRA run 12 rounds × ¼ local epoch (each round trains on the next quarter of "
    "every shard), the same 3 passes over each client's data as 3 rounds × 1 epoch, and I2CL central and "
    "local-only train those 3 passes: in `docs/ablation-bfloat16` (SmolLM2, label-only, seeds 0–2) 12 × ¼ "
    "scored higher than 3 × 1 on Subj (76.2 ± 2.2 vs 71.2 ± 5.1), Emotion (45.5 vs 44.3) and AG News (82.7 vs "
    "80.8), higher or equal in 8 of 9 (task, seed) pairs, at the same client CPU seconds; 24 rounds × ⅛ scored "
    "the same within noise (76.0 ± 4.3, 46.0, 83.0; +0.2 points over the 9 pairs) at 1.1× the client CPU seconds."
)

# What a sparser scoring setting (issue 33) changes against the paper, by setting and value: the same numbers
# estimated from the same test examples at a fraction of the forward passes.
SCORING_NOTES = {
    ("scored_rounds", "doubling"): "Scoring rounds: IFed-ICL and FedAvg-LoRA are scored after rounds 0, 1, 2, 4, 8 "
    "and the last (`scored_rounds=doubling`), not after every round; every round's Λ is kept in IFed-ICL's cells.",
    ("client_test", "split"): "Scoring clients: local ICL and local-only calibration score each client on its own "
    "class-stratified 1/clients of the test set and report the pooled predictions (`client_test=split`), where "
    "the paper scores every client on the whole test set; the clients' spread is corrected for the slices' "
    "sampling noise.",
}
ALSO_SCORED_NOTE = (
    "Scored besides: IFed-ICL after round(s) {rounds} too (`also_scored_rounds`), where a round budget decides the "
    "client-CPU target against FedAvg-LoRA; a cell computed before that was topped up from the Λ it kept (its "
    "`scored_later`)."
)

DIFFERENCES = [
    "Models: SmolLM2-135M-Instruct and Gemma-3-270M (4-bit GGUF weights dequantized to float32), not Llama-3-8B / "
    "Qwen2.5-7B: the 8B models do not fit this project's CPU budget; absolute accuracies are therefore lower and "
    "a 135M/270M model may lack the features a task needs.",
    "Training data: `max_train` examples per task (the paper: 5,000), chosen so the whole report runs in "
    "core-hours on CPUs, and a class-balanced test sample of `test_size` (the paper: 500); the split is the "
    "paper's (10 clients, Dirichlet α=0.5).",
    "Seeds: mean ± std over the seeds listed (split, demonstrations, client sampling, training order); the test "
    "sample is fixed across seeds.",
    "Objective: every trainable method trains on the label-only loss (cross-entropy of the label word against "
    "the other label words), the paper's IFed-ICL and I2CL the full-vocabulary one; the full-vocabulary rows "
    "(IFed-ICL with the paper's local steps, SmolLM2 × Subj and Emotion) are in `docs/ablation-recipe`.",
    "IFed-ICL's rounds: each round is a trust-region step on the pooled label-only loss from the sampled clients' "
    "gradients and Gauss-Newton matrices of Λ (`--stage2 gauss-newton`, the default since issue 30; "
    "`docs/recipe.md`), where the paper averages the clients' local AdamW runs (`--stage2 local-steps`).",
    "Stage 1: each IFed-ICL client builds its context vectors from 32 of its examples, evenly spaced "
    "(`--stage1-examples 32`, the default since issue 30: every example's accuracy for half of stage 1's CPU); "
    "the paper's from all of them. Centralized I2CL and local-only calibration use every example.",
    "Hosting: the federated methods' 10 clients run on 2 Ray actor processes (`--actors 2`, one per core) rather "
    "than 10 contending for 2 cores, which inflated the CPU seconds each measured; with `--workers 2` one cell "
    "that trains alone may still run beside a federated one, for IFed-ICL and FedAvg-LoRA alike.",
    "Budget parity: I2CL central and local-only calibration run rounds × local epochs passes over their data, the "
    "passes a federated client makes; FedAvg-LoRA (rank 8 on q/v) uses the same rounds and local epochs as IFed-ICL.",
    "Training noise: the Λ methods calibrate with I2CL's training-only noise (1e-3 × the block output's norm) on "
    "SmolLM2 and with 1e-4 on Gemma 3, whose normalized block outputs do not tolerate 1e-3: centralized I2CL on "
    "Gemma-3-270M × Subj (seed 0, `docs/ablation-gemma`) scored 66.5% label-only and 50.0% full-vocab with 1e-3, "
    "below zero-shot (68.0), and 85.0% / 81.0% with 1e-4 (85.0 / 80.5 without noise).",
]


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _pct(s: dict | None, seeds: int) -> str:
    if s is None:
        return "–"
    n = len(s["seeds"])
    spread = f" ± {100 * s['accuracy_std']:.1f}" if n > 1 else ""  # one seed has no spread
    text = f"{100 * s['accuracy_mean']:.1f}{spread}"
    return text if n >= seeds else f"{text} ({n}/{seeds} seeds)"


def accuracy_table(results: dict, *, planned: bool = False, objective_in_header: bool = True) -> list[str]:
    """The report's accuracy table: one row per model × task, one column per method, mean ± std over seeds and how
    many seeds finished where not all. ``planned``: a row for every model × task pair of the spec, finished cells
    or not, so a reader sees the whole grid."""
    spec, summary, columns = results["spec"], results["summary"], results["columns"]
    seeds = len(spec["seeds"])
    if objective_in_header:
        labels = [column_label(c) for c in columns]
    else:
        labels = [column_label(c.partition("@")[0]) for c in columns]
    model_tasks = spec.get("model_tasks", {})
    if planned:
        pairs = [
            (m, t)
            for m in spec["models"]
            for t in (safe_name(t) for t in spec["tasks"])
            if m not in model_tasks or t in model_tasks[m]
        ]
    else:
        pairs = [(m, t) for m, by_task in summary.items() for t in by_task]
    rows = [[m, t] + [_pct(summary.get(m, {}).get(t, {}).get(c), seeds) for c in columns] for m, t in pairs]
    return _table(["model", "task", *labels], rows)


HEADLINE_BEGIN = "<!-- headline: docs/report's accuracy table; `ifedicl report --render-only --readme README.md` -->"
HEADLINE_END = "<!-- end of headline -->"


def headline_span(markdown: str) -> tuple[int, int]:
    """Where the headline block starts and ends in ``markdown`` (markers included); ValueError if it has none."""
    begin, end = markdown.find(HEADLINE_BEGIN), markdown.find(HEADLINE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"has no headline block ({HEADLINE_BEGIN} ... {HEADLINE_END})")
    return begin, end + len(HEADLINE_END)


def with_headline(markdown: str, results: dict) -> str:
    """``markdown`` with the text between :data:`HEADLINE_BEGIN` and :data:`HEADLINE_END` replaced by the report's
    accuracy table over the whole planned grid (the README's evaluation section), so it is rebuilt from the cells
    like ``results.md`` and cannot drift from them."""
    begin, end = headline_span(markdown)
    objectives = results["spec"]["objectives"]
    table = accuracy_table(results, planned=True, objective_in_header=len(objectives) > 1)
    block = "\n".join([HEADLINE_BEGIN, *table, HEADLINE_END])
    return markdown[:begin] + block + markdown[end:]


def render_report(results: dict) -> str:
    spec, summary = results["spec"], results["summary"]
    columns = results["columns"]
    base = spec["base"]
    lines = [
        "# IFed-ICL report: the paper's table on real models",
        "",
        "Reproduce (resumes from the committed cells; a finished cell is never recomputed):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "Check one cell of a complete grid: delete its file "
        "(`<out>/<model>/<objective>/cells/<method>__<task>__a<α>__s<seed>.json`) and run the command above with "
        "`--max-cells 1`: every other cell resumes, that one is computed again from its seed; `git diff` shows "
        "what moved.",
        "",
        f"Code version of this summary: `{results['code_version']}`; the cells were computed with "
        + ", ".join(f"`{v}`" for v in results["cell_code_versions"])
        + f". Written {results['created']}.  ",
        f"Progress: {results['finished']}/{results['total']} cells finished "
        f"({fmt_duration(results['cost']['wall_s'])} wall, {results['cost']['cpu_s'] / 3600:.2f} CPU hours so far).",
        "",
        "## Settings",
        "",
        f"Models {', '.join(f'`{m}`' for m in spec['models'])}; "
        f"tasks {', '.join(safe_name(t) for t in spec['tasks'])}"
        + "".join(f" ({m}: {', '.join(ts)} only)" for m, ts in spec.get("model_tasks", {}).items())
        + "; "
        f"seeds {spec['seeds']}; objectives {spec['objectives']}.  ",
        ", ".join(f"{k}={v}" for k, v in sorted(base.items())) + ".",
        "",
        "What differs from the paper, and why:",
        "",
        *[f"- {d}" for d in DIFFERENCES],
        *([f"- {BFLOAT16_NOTE}"] if base.get("dtype") == "bfloat16" else []),
        *([f"- {RECIPE_NOTE}"] if all(base.get(k) == REPORT_DEFAULTS[k] for k in ("rounds", "local_epochs")) else []),
        *[f"- {note}" for (name, value), note in SCORING_NOTES.items() if base.get(name) == value],
        *([f"- {ALSO_SCORED_NOTE.format(rounds=also)}"] if (also := base.get("also_scored_rounds")) else []),
        "",
        "## Accuracy (%), mean ± std over seeds",
        "",
        *accuracy_table(results),
    ]
    header = ["model", "task"] + [column_label(c) for c in columns]
    lines += ["", "## What each cell cost: mean wall seconds / mean CPU seconds per cell (all clients)", ""]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            rows.append(
                [model, task]
                + [
                    f"{by_col[c]['cost']['wall_s_mean']:.0f} / {by_col[c]['cost']['cpu_s_mean']:.0f}"
                    if c in by_col
                    else "–"
                    for c in columns
                ]
            )
    lines += _table(header, rows)
    lines += [
        "",
        "Wall: the cell's elapsed time on this machine (shared, so an upper bound). CPU: this process's CPU seconds "
        "plus, for IFed-ICL and FedAvg-LoRA, the CPU seconds every client actor measured for its own requests.",
        "",
        "## Client compute and bytes, IFed-ICL vs FedAvg-LoRA (per client, mean over seeds)",
        "",
    ]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            for objective in spec["objectives"]:
                ifed, lora = by_col.get(f"ifedicl@{objective}"), by_col.get(f"fedavg_lora@{objective}")
                if not (ifed and lora):
                    continue
                up_i, up_l = ifed["comm"]["round_up_per_client"], lora["comm"]["round_up_per_client"]
                cpu_i, cpu_l = ifed["client_cpu_seconds_mean"], lora["client_cpu_seconds_mean"]
                rows.append(
                    [
                        model,
                        task,
                        objective,
                        f"{cpu_i:.1f}",
                        f"{cpu_l:.1f}",
                        f"{cpu_i / cpu_l:.2f}×" if cpu_l else "–",
                        f"{ifed['comm']['stage1_up_per_client']:.0f}",
                        f"{up_i:.0f}",
                        f"{up_l:.0f}",
                        f"{up_l / up_i:,.0f}×" if up_i else "–",
                    ]
                )
    lines += _table(
        [
            "model",
            "task",
            "objective",
            "IFed-ICL client CPU s",
            "FedAvg-LoRA client CPU s",
            "IFed-ICL / LoRA",
            "IFed-ICL stage-1 up B",
            "IFed-ICL up B/round",
            "LoRA up B/round",
            "LoRA / IFed-ICL",
        ],
        rows,
    )
    lines += ["", "## Targets (issue 11), on the finished cells", ""]
    rows = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            for objective in spec["objectives"]:
                ifed = by_col.get(f"ifedicl@{objective}")
                if ifed is None:
                    continue
                acc = ifed["accuracy_mean"]

                def beats(col: str, acc=acc, by_col=by_col) -> str:
                    other = by_col.get(col)
                    return "–" if other is None else ("yes" if acc > other["accuracy_mean"] else "no")

                central = by_col.get(f"i2cl_central@{objective}")
                local = by_col.get(f"local_calibration@{objective}")
                rows.append(
                    [
                        model,
                        task,
                        objective,
                        beats("zero_shot"),
                        beats("local_icl"),
                        beats(f"fedavg_lora@{objective}"),
                        "–" if central is None else f"{100 * (acc - central['accuracy_mean']):+.1f}",
                        "–" if local is None else f"{100 * (acc - local['accuracy_mean']):+.1f}",
                    ]
                )
    lines += _table(
        [
            "model",
            "task",
            "objective",
            "> zero-shot",
            "> local ICL",
            "> FedAvg-LoRA",
            "vs I2CL central (target ≥ −1)",
            "global − local-only (target ≥ +10.7)",
        ],
        rows,
    )
    lines += _recipe_targets(results)
    lines += [
        "",
        "Per group (model × objective), the harness's own tables (communication, client compute, global vs local "
        "coefficients, accuracy after every round) and plots:",
        "",
    ]
    lines += [f"- [{g}]({g}/results.md)" for g in results["groups"]]
    return "\n".join(lines) + "\n"


def _recipe_targets(results: dict) -> list[str]:
    """Issue 30's targets on the finished cells: paired per-seed differences, the task mean against
    centralized I2CL, and the client CPU against FedAvg-LoRA's at the full budget and at the fewest rounds
    that reach its accuracy."""
    paired = results.get("paired", {})
    if not paired:
        return []
    lines = [
        "",
        "## The recipe's targets (issue 30): differences per seed, and client CPU per round budget",
        "",
    ]
    rows = []
    for model, by_task in paired.items():
        for task, by_objective in by_task.items():
            for objective, entry in by_objective.items():
                budget = entry.get("budget") or {}
                reached = budget.get("round")
                at_half = budget.get("half_lora_cpu")
                rows.append(
                    [
                        model,
                        task,
                        objective,
                        _paired(entry.get("vs fedavg_lora")),
                        _paired(entry.get("vs i2cl_central")),
                        f"{budget['whole_run_cpu_ratio']:.2f}×" if budget.get("whole_run_cpu_ratio") else "–",
                        "–" if not budget else (f"{reached}" if reached else "not reached"),
                        f"{budget['cpu_ratio']:.2f}×" if reached and budget.get("cpu_ratio") is not None else "–",
                        f"{at_half['round']}: {100 * (at_half['accuracy'] - budget['lora_accuracy']):+.1f}"
                        if at_half
                        else "–",
                    ]
                )
    lines += _table(
        [
            "model",
            "task",
            "objective",
            "IFed-ICL − FedAvg-LoRA (points, per seed)",
            "IFed-ICL − I2CL central",
            "client CPU, IFed-ICL / LoRA",
            "rounds to LoRA's accuracy",
            "client CPU there / LoRA's",
            "within ½ LoRA's CPU: round, − LoRA",
        ],
        rows,
    )
    means = []
    for model, by_task in paired.items():
        for objective in results["spec"]["objectives"]:
            vs_central = {
                task: by_objective[objective]["vs i2cl_central"]
                for task, by_objective in by_task.items()
                if "vs i2cl_central" in by_objective.get(objective, {})
            }
            recipe_tasks = [task for task in RECIPE_TASKS if task in vs_central]
            # every task's mean and issue 30's four tasks' mean: one line where they are the same tasks
            task_sets = {frozenset(vs_central): tuple(vs_central), frozenset(recipe_tasks): tuple(recipe_tasks)}
            for tasks in task_sets.values():
                if tasks:
                    ifed = float(np.mean([vs_central[t]["ifedicl_mean"] for t in tasks]))
                    central = float(np.mean([vs_central[t]["baseline_mean"] for t in tasks]))
                    means.append(_mean_against_central(model, objective, tasks, ifed, central))
            half_budget = {
                task: by_task[task][objective]["half_budget"]
                for task in recipe_tasks
                if "half_budget" in by_task[task][objective]
            }
            if recipe_tasks and len(half_budget) == len(recipe_tasks):
                ifed = 100 * float(np.mean([at["accuracy"] for at in half_budget.values()]))
                central = 100 * float(np.mean([at["baseline_accuracy"] for at in half_budget.values()]))
                means.append(_mean_against_central(model, objective, tuple(recipe_tasks), ifed, central, "½"))
    lines += ["", *[f"- Mean over tasks: {m}." for m in sorted(means)]]
    lines += [
        "",
        "Differences are IFed-ICL's accuracy minus the other method's on the same split and test sample, per seed, "
        "mean ± std over the seeds both finished. A round budget: IFed-ICL's second-order round keeps no schedule "
        "and FedAvg-LoRA restarts its schedule every round, so a cell's first k rounds are a k-round run; its client "
        "CPU seconds are those the clients had spent by then (stage 1 included), against FedAvg-LoRA's whole run, "
        "both averaged over the seeds both finished, as are the whole runs' client CPU and the means over tasks "
        f"(issue 30's target is read on {', '.join(RECIPE_TASKS)}). Within ½ LoRA's CPU: the last round whose "
        "client CPU is at most half of FedAvg-LoRA's whole run, and its accuracy minus LoRA's; the mean over tasks "
        "at that budget is set against I2CL central's too, so that all three targets can be read at one budget.",
    ]
    return lines


def _mean_against_central(
    model: str, objective: str, tasks: tuple, ifedicl: float, central: float, budget: str = ""
) -> str:
    """One "mean over tasks" line: IFed-ICL's mean accuracy (at its whole run, or at ``budget`` of LoRA's client
    CPU) against centralized I2CL's on the same tasks and seeds."""
    at = f" within {budget} of FedAvg-LoRA's client CPU" if budget else ""
    return (f"{model} [{objective}], {', '.join(tasks)}: IFed-ICL{at} {ifedicl:.1f}, I2CL central {central:.1f} "
            f"({ifedicl - central:+.1f}; target ≥ −1)")  # fmt: skip


def _paired(entry: dict | None) -> str:
    if not entry:
        return "–"
    n = len(entry["seeds"])
    spread = f" ± {entry['std']:.1f}" if n > 1 else ""  # one seed has no spread
    return f"{entry['mean']:+.1f}{spread} (n={n})"


def render_ablation(results: dict) -> str:
    spec, summary = results["spec"], results["summary"]
    lines = [
        "# IFed-ICL recipe ablation",
        "",
        "Reproduce (resumes from the committed cells):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Code version `{results['code_version']}`; cells computed with "
        + ", ".join(f"`{v}`" for v in results["cell_code_versions"])
        + f". Written {results['created']}. {results['finished']}/{results['total']} cells finished.  ",
        f"Base settings: {', '.join(f'{k}={v}' for k, v in sorted(spec['base'].items()))}; seeds {spec['seeds']}.",
        "Each variant changes one thing from the default recipe (I2CL's: AdamW lr 1e-2, batch 2, warm-up + cosine "
        "restarted every round, unweighted means, both blocks, every local example in stage 1, float32 stage-1 "
        "coding). The client budget "
        "is the base's rounds × local epochs passes over each client's data; the cell shows accuracy (%, mean ± std "
        "over seeds) / mean client CPU seconds per client (all rounds, measured in the actors).",
        "",
    ]
    keys = []
    for model, by_task in summary.items():
        for task, by_col in by_task.items():
            for col in by_col:
                base_col = col.partition("#")[0]
                if (model, task, base_col) not in keys:
                    keys.append((model, task, base_col))
    header = ["variant"] + [f"{m} {t} {column_label(c)}" for m, t, c in keys]
    rows = []
    for variant in spec["variants"]:
        row = [variant]
        for model, task, col in keys:
            s = summary[model][task].get(f"{col}#{variant}")
            row.append("–" if s is None else f"{_pct(s, len(spec['seeds']))} / {s['client_cpu_seconds_mean']:.0f} s")
        rows.append(row)
    lines += _table(header, rows)
    return "\n".join(lines) + "\n"
