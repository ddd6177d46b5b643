"""The defaults and variants the report and the ablation compute with: data, not code.

Their comments record why each value is what it is (the measurements that chose it); ``ifedicl report``
and ``ifedicl ablate`` (:mod:`ifedicl.cli.report`) read them, the renderers quote the report's.
"""

from __future__ import annotations

from ifedicl.evaluation.settings import FEDERATION_HASH_BASELINE
from ifedicl.federation_job.options import LOSS_CHECK_FIELDS

# What `ifedicl report` computes with unless --dtype/--rounds/--local-epochs/--test-size say otherwise (the
# ablation's: ABLATION_DEFAULTS). float32: the machines this project gets (2-core AVX2) have no bfloat16 kernels,
# where bfloat16 runs far slower; the first report's cells (docs/report-bfloat16) were bfloat16 on a CPU that had
# them. The budget is 3 passes over each client's data as 12 rounds × ¼ epoch, not 3 × 1 (RECIPE_NOTE). 500
# test examples, the paper's, so a 1-point difference is 5 examples.
REPORT_DEFAULTS = {"dtype": "float32", "rounds": 12, "local_epochs": 0.25, "test_size": 500}
# The report's grid (issue 33): the paper's tasks for both models, SST-2 and TREC for SmolLM2 only.
REPORT_TASKS = "subj,emotion,agnews,sst2,trec"
REPORT_MODELS = "smollm2-135m,gemma3-270m"
REPORT_MODEL_TASKS = {"gemma3-270m": ["subj", "emotion", "agnews"]}
# Every federated cell's hosting: 10 clients on 2 actor processes, one per core of the 2-core machines the report
# is computed on (10 processes on 2 cores inflate each actor's measured CPU seconds: docs/recipe.md).
# Scoring at a cost the grid can finish (issue 33; neither changes what a cell measures): federated cells score
# rounds 0, 1, 2, 4, 8 and 12 (6 scorings, not 13: measured ~48 s each for SmolLM2 on Subj), and local ICL and
# local-only calibration score each client on its own tenth of the test set (measured 536 s and 1,103 s per Subj
# cell scoring every client on all 500). IFed-ICL cells also score rounds 3, 5, 6 and 7, where issue 30's client-CPU
# target is decided (the first round past FedAvg-LoRA's accuracy: between 4 and 8 a doubling schedule would put it
# at 8, up to twice the CPU). A cell keeps every round's Λ: an older one is topped up from them.
REPORT_BASE: dict = {
    "federation": {"actors": 2},
    "scored_rounds": "doubling",
    "client_test": "split",
    "also_scored_rounds": [3, 5, 6, 7],
}

# The ablation's recipes were measured against float32 stage-1 coding, the default until this ablation chose
# int8: its base keeps float32, so each variant differs from "default" by its one change ("stage 1 coded int8"
# is the int8 row) and the cells computed before the switch stay current.
# It also keeps the rounds of local AdamW steps (stage2 local-steps) that every variant but the second-order
# ones changes one thing of; the second-order round became the default after them (issue 30), and the stage 1 of
# every client example that the stage-1 variants take fewer of (--stage1-examples became the default after them).
ABLATION_BASE: dict = {"federation": {"vector_coding": "float32", "stage2": "local-steps", "stage1_examples": 0}}
# The trust region's test as it was before the sampled check with a confidence test became the default: the
# second-order variants measured then keep their cells (and say what they computed).
EVERY_ROW_CHECKED = {name: FEDERATION_HASH_BASELINE[name] for name in LOSS_CHECK_FIELDS}
# The curvature every second-order variant computed before --curvature auto (exact on every row, no memory) unless
# it names one.
EXACT_CURVATURE = {
    name: FEDERATION_HASH_BASELINE[name] for name in ("curvature", "curvature_memory", "curvature_fraction")
}


# The step every second-order variant was measured with (no damping floor, every window remembered), named so that
# a default changed later leaves them computing what they measured (--step-ridge 0.3 with --no-remember-undone was
# a candidate default: docs/recipe.md).
UNDAMPED_STEP = {name: FEDERATION_HASH_BASELINE[name] for name in ("step_ridge", "remember_undone")}


def _gauss_newton(**federation) -> dict:
    """A second-order variant's federation flags: ``federation`` over the undamped step it was measured with."""
    return {"stage2": "gauss-newton", **UNDAMPED_STEP, **federation}


def _second_order(**federation) -> dict:
    """A second-order variant's federation flags: ``federation`` over the exact curvature it was measured with."""
    return _gauss_newton(**{**EXACT_CURVATURE, **federation})


# Its cells' model dtype and budget unless --dtype/--rounds/--local-epochs say otherwise: the recipe every
# variant was first measured against (the report's own: REPORT_DEFAULTS).
ABLATION_DEFAULTS = {"dtype": "float32", "rounds": 3, "local_epochs": 1.0, "test_size": 200}

ABLATION_VARIANTS: dict[str, dict] = {
    # The client compute budget is fixed at the base's rounds × local epochs passes over each client's data;
    # every variant keeps it (or, for stage 1, spends less). Each row states its measured client CPU.
    "default": {},
    "1 round × 3 epochs": {"rounds": 1, "local_epochs": 3},
    "one schedule across rounds": {"recipe": {"schedule": "global"}},
    "lr 3e-3": {"recipe": {"lr": 3e-3}},
    "lr 3e-2": {"recipe": {"lr": 3e-2}},
    "calib batch 1": {"recipe": {"batch_size": 1}},
    "calib batch 8": {"recipe": {"batch_size": 8}},
    "weighted means": {"weighted": True},
    "attention only": {"recipe": {"modules": "attn"}},
    "MLP only": {"recipe": {"modules": "mlp"}},
    "stage 1: 5 examples per client": {"recipe": {"stage1_examples": 5}},
    "stage 1: 20 examples per client": {"recipe": {"stage1_examples": 20}},
    "stage 1 coded float16": {"federation": {"vector_coding": "float16"}},
    "stage 1 coded int8": {"federation": {"vector_coding": "int8"}},
    "12 rounds × ¼ epoch": {"rounds": 12, "local_epochs": 0.25},
    "24 rounds × ⅛ epoch": {"rounds": 24, "local_epochs": 0.125},
    # FedAvgM's server learning rate (no momentum): each round Λ moves 3× the clients' mean move, at no client cost.
    "server lr 3": {"federation": {"server_lr": 3.0}},
    # Not a recipe change but the report's cost: the same cell with the frozen model in bfloat16 (Λ, the
    # vectors' mean and the optimizer stay float32); ~2.4x faster forward+backward on AVX512-bf16 CPUs.
    "bfloat16 model": {"dtype": "bfloat16"},
    # Item 6: the recalibration after the default federation, on a new split of the clients' data, from the
    # live Λ or from scratch (same rounds, same client compute; the cell's client CPU is the recalibration's).
    "recalibration: warm start": {"recipe": {"recalibrate": "warm"}},
    "recalibration: cold start": {"recipe": {"recalibrate": "cold"}},
    "label-prior correction": {"recipe": {"prior_correction": True}},
    # I2CL's training-only noise on the block outputs; the default is the model family's (1e-3, Gemma 3: 1e-4).
    "training noise 1e-3": {"recipe": {"noise_scale": 1e-3}},
    "training noise 1e-4": {"recipe": {"noise_scale": 1e-4}},
    "no training noise": {"recipe": {"noise_scale": 0.0}},
    # Issue 30's candidates. A second-order round: clients send the label-only loss's gradient and Gauss-Newton
    # matrix on their round's window, the server takes a trust-region step on the pooled objective.
    "gauss-newton": {"federation": _second_order(**EVERY_ROW_CHECKED)},
    # (No "fewer rounds" row: the trust region keeps no schedule, so a k-round run is the first k rounds of the
    # 12-round one, whose per-round accuracy every cell records.)
    # The curvature from one label drawn per example: two backward passes whatever the classes (C - 1 exact).
    "gauss-newton sampled": {"federation": _second_order(curvature="sampled", **EVERY_ROW_CHECKED)},
    # Each step on the decayed sum of every window's quadratic model, re-centred at the current Λ (γ = 0.75: a
    # window's weight falls to a third after 4 rounds, one pass over the data at ¼ epoch per round), not on the
    # last window's alone: SST-2 and Emotion peaked early and drifted with each new window.
    "gauss-newton memory 0.75": {"federation": _second_order(curvature_memory=0.75, **EVERY_ROW_CHECKED)},
    # Both, under the default check: one drawn label's curvature is noisy in a window (Emotion stalled at 50%), and
    # memory averages about four windows' worth of it; two backward passes per round instead of C - 1. Emotion 57.0
    # (exact 54.5) for 41% less client CPU, AG News 83.0 (exact 85.0): --curvature auto's rule (options.py).
    "gauss-newton sampled with memory 0.75": {"federation": _second_order(curvature="sampled", curvature_memory=0.75)},
    # The exact matrix from a quarter of each window's rows (the gradient from all): on AG News (4 classes) a round's
    # backward passes per example go from 3 to 1.5, and memory averages about four windows' quarters; the sampled
    # matrix saved one pass of three and was noisier (83.0 against 85.0).
    "gauss-newton matrix on ¼ with memory 0.75": {
        "federation": _second_order(curvature_fraction=0.25, curvature_memory=0.75)
    },
    # Stage 1 from 16 examples of each shard (160 pooled; I2CL's own vectors come from 5 per class), not all ~60
    # (the cells up to 388cf00 took each shard's first 16, later ones 16 evenly spaced: on the shared data, whose
    # files are shuffled, two draws of the same kind): stage 1 was a fifth of a client's CPU by the round where
    # IFed-ICL passes FedAvg-LoRA. Under the default round (--curvature auto), so on each task it changes only
    # stage 1 from that task's default row.
    "gauss-newton stage 1: 16 examples per client": {
        "federation": _gauss_newton(), "recipe": {"stage1_examples": 16}
    },
    # Twice that (320 pooled): on AG News 16 per client scored 85.0 against 87.0 with every example, and moved the
    # pooled mean by 2.6% of its norm where 32 moves it by 1.5% (bench/stage1_examples.py).
    "gauss-newton stage 1: 32 examples per client": {
        "federation": _gauss_newton(), "recipe": {"stage1_examples": 32}
    },
    # Above 4 classes the sampled matrix (auto's choice then) from a quarter of each window's rows (the gradient from
    # all): a round's backward passes per example go from 2 to 1.25, memory averaging the quarters as it does AG
    # News's exact ones. Under the default round otherwise, so on Emotion it changed only the fraction from that
    # task's default row then. Emotion 58.5 against 57.0, 2.5 lower by round 3, 97 client CPU s against 101: not the
    # default (docs/recipe.md). The sampled matrix is named since auto chose the empirical Fisher above 4 classes, so
    # the variant still computes what its name and its Emotion cell say (the cell's hash is unchanged).
    "gauss-newton sampled matrix on ¼": {
        "federation": _gauss_newton(curvature="sampled", curvature_fraction=0.25)
    },
    # Above 4 classes the empirical Fisher (the per-example gradients' outer products) instead of a drawn label's:
    # the gradient's backward pass gives it, so a round takes one backward pass per example instead of two, with
    # the sampled default's memory. Biased where the model is wrong, which early rounds are.
    "gauss-newton empirical fisher": {"federation": _gauss_newton(curvature="empirical")},
    # Above 4 classes the exact matrix, as AG News takes it, from a fraction of each window's rows instead of one
    # drawn label on every row: 1 + q(C - 2) backward passes per example, on Emotion (C = 6) 2 at ¼ (the sampled
    # matrix's cost: which estimate is better for the same passes?) and 1.5 at ⅛ (a quarter fewer passes).
    "gauss-newton exact matrix on ¼": {
        "federation": _gauss_newton(curvature="exact", curvature_fraction=0.25)
    },
    "gauss-newton exact matrix on ⅛": {
        "federation": _gauss_newton(curvature="exact", curvature_fraction=0.125)
    },
    # The first round's trust radius 2 instead of 0.5: on Emotion every step of the report's seeds 0 and 1 ended on
    # the boundary, and seed 1's radius stayed at 0.5 for three rounds and at 1 for seven (docs/recipe.md).
    "gauss-newton first radius 2": {"federation": _gauss_newton(trust_radius=2.0)},
    # Each round publishes the mean of the last two rounds' Λ while the trust region steps from its own: no client
    # CPU, the same trajectory (tail_average.py); against accepted steps that cost accuracy (docs/recipe.md).
    "gauss-newton average of 2 rounds": {"federation": _gauss_newton(average_rounds=2)},
    # Half the examples per round (each round the next ⅛ of every shard; 16 rounds: 2 whole passes): is a second-
    # order round limited by its steps or by its window's data? Each round costs half of a "gauss-newton" round.
    "gauss-newton ⅛ window": {"federation": _second_order(**EVERY_ROW_CHECKED), "rounds": 16, "local_epochs": 0.125},
    # The trust-region test from the new end's statistics, not a forward at the previous Λ: a round's passes -¼ (C=2).
    "gauss-newton model check": {"federation": _second_order(step_check="model")},
    # The loss check on a quarter of each window's rows, paired with their loss at the new Λ: the previous Λ's
    # forward on ¼ of the examples (a binary round: 1.37× a LoRA pass -> about 1.0×, bench/client_rounds.py).
    "gauss-newton check on ¼": {"federation": _second_order(step_check_fraction=0.25, step_check_confidence=0.0)},
    "gauss-newton check on ¼ within 1 s.e.": {
        "federation": _second_order(step_check_fraction=0.25, step_check_confidence=1.0)
    },
    # Early stopping on the clients' held-out loss (a fifth of each shard kept out of the rounds; two rounds
    # without a new best end the run on the best Λ): fewer rounds, and no drift past the best one.
    "gauss-newton early stopping": {"federation": _second_order(holdout_fraction=0.2, patience=2, **EVERY_ROW_CHECKED)},
    # Server optimizers on the aggregate's change (FedAdam: every coefficient moves ~lr per round; FedAvgM).
    "server adam lr 0.02": {"federation": {"server_optimizer": "adam", "server_lr": 0.02, "server_decay": "cosine"}},
    "server momentum 0.8": {
        "federation": {"server_optimizer": "momentum", "server_momentum": 0.8, "server_decay": "cosine"}
    },
    "class-balanced stage 1": {"federation": {"stage1": "class-balanced"}},
    "prior correction + weighted + 12 × ¼": {
        "rounds": 12,
        "local_epochs": 0.25,
        "weighted": True,
        "recipe": {"prior_correction": True},
    },
}
