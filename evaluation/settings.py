"""What one evaluation run is: its settings and its cells (method × task × α × seed).

A cell is the unit of work and of resume. Methods that never see the client split
(zero-shot, few-shot ICL, centralized I2CL) get ``alpha=None`` cells, computed once
and shown in every α's table, instead of being recomputed per α.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, get_args

from ifedicl.federation_job.options import (
    IFEDICL_ONLY_FIELDS,
    LAMBDA_ROUND_FIELDS,
    LOSS_CHECK_FIELDS,
    FederationOptions,
    resolve_curvature,
)

# Display order = the paper's table order, cheap methods first.
METHODS: tuple[str, ...] = (
    "zero_shot",
    "few_shot_icl",
    "local_icl",
    "i2cl_central",
    "local_calibration",
    "fedavg_lora",
    "ifedicl",
)
METHOD_LABELS: dict[str, str] = {
    "zero_shot": "zero-shot",
    "few_shot_icl": "few-shot ICL",
    "local_icl": "local ICL",
    "i2cl_central": "I2CL (central)",
    "local_calibration": "local-only calib.",
    "fedavg_lora": "FedAvg-LoRA",
    "ifedicl": "IFed-ICL",
}
# Recipe keys the harness itself reads (not CalibrationConfig fields): stage-1 examples per client, and a
# scheduled recalibration after IFed-ICL's federation ("warm": from its Λ, "cold": from the initial Λ).
HARNESS_RECIPE_KEYS = ("stage1_examples", "rounds_total", "recalibrate")
RECALIBRATION_STARTS = ("warm", "cold")
SPLIT_FREE = frozenset({"zero_shot", "few_shot_icl", "i2cl_central"})  # do not depend on α
FEDERATED = frozenset({"fedavg_lora", "ifedicl"})
PER_CLIENT = frozenset({"local_icl", "local_calibration"})  # scored per client; the cell is their mean
PROMPT_ONLY = frozenset({"zero_shot", "few_shot_icl", "local_icl"})  # no training: no recipe, no federation
# The settings only training reads: a prompt-only cell's hash leaves them out, so a new recipe or budget
# leaves the zero-shot and ICL cells current.
TRAINING_ONLY = ("rounds", "local_epochs", "lora_rank", "lora_alpha", "lora_lr", "weighted", "objective", "recipe",
                 "federation")  # fmt: skip
# The methods that train alone, under one schedule over rounds × local epochs (the federation's passes):
# their hash names the passes, so a new split of the same passes (3 × 1 -> 12 × ¼) leaves their cells current.
TRAINS_ALONE = frozenset({"i2cl_central", "local_calibration"})


FEDERATION = FederationOptions()
ScoredRounds = Literal["every", "doubling"]
ClientTest = Literal["full", "split"]


@dataclass
class EvalSettings:
    """Everything that changes a number. Hashed into each cell so a stale cell is recomputed."""

    model: str
    tasks: list[str]
    clients: int = FEDERATION.clients  # the federation's defaults are declared once (FederationOptions)
    alphas: list[float] = field(default_factory=lambda: [0.5])
    rounds: int = FEDERATION.rounds
    seeds: list[int] = field(default_factory=lambda: [0])
    test_size: int = 500
    shots: int = 4
    max_train: int | None = 5000
    local_epochs: float = FEDERATION.local_epochs  # a fraction f < 1: each round trains on the next f of every shard
    min_shard: int = FEDERATION.min_shard
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_lr: float = 5e-4
    weighted: bool = FEDERATION.weighted  # paper: unweighted FedAvg of vectors, Λ (and, for parity, LoRA weights)
    # Training loss of every trainable method: "label-only" (the default, as federate's) | "full-vocab"
    # (ifedicl.federation_job.objective); None, in older cells, kept each method's own: full-vocab for I2CL,
    # local-only and IFed-ICL (I2CL's), label-only for LoRA.
    objective: str | None = FEDERATION.objective
    batch_size: int = 16
    dtype: str = "float32"
    # The Λ methods' recipe (I2CL central, local-only, IFed-ICL), for the ablation: CalibrationConfig fields
    # (lr, batch_size, schedule, modules, weight_decay, warmup_fraction, ...) and "stage1_examples" (per client).
    recipe: dict = field(default_factory=dict)
    # The federation flags of ``ifedicl federate`` that differ from their defaults and have no field above
    # (aggregator, secure aggregation, DP, fraction, round timeout, ...): FederationOptions by name.
    federation: dict = field(default_factory=dict)
    # dtype of the prompt-only methods (zero-shot, few-shot and local ICL); None: ``dtype``. bfloat16 is ~3x
    # faster on CPUs with AVX512-bf16 but flips near-tie predictions (measured: 92% argmax agreement on Subj).
    inference_dtype: str | None = None
    # torch intra-op threads in this process (None: torch's default). Does not change a number (not hashed);
    # on a shared machine 1 thread avoids OpenMP spin-waits (measured 4.7x faster zero-shot under load).
    threads: int | None = None
    test_seed: int = 0  # the test sample is the same for every seed: spread over seeds is the split's and training's
    # Where the costly scorings spend less, for a grid that must finish (issue 33); neither changes what a cell
    # measures, only how densely. "every" | "doubling": a federated cell scores its Λ after every round, or after
    # rounds 0, 1, 2, 4, 8, … and its last (the accuracy-per-round curve at log spacing; 6 scorings for 12 rounds).
    scored_rounds: ScoredRounds = "every"
    # "full" | "split": local ICL and local-only calibration score every client on the whole test set, or each on
    # its own class-stratified 1/clients of it: the mean over clients from the same test examples at 1/clients
    # of the cost (:func:`ifedicl.evaluation.per_client.client_test_indices`).
    client_test: ClientTest = "full"
    # Rounds an IFed-ICL cell scores besides ``scored_rounds``' (the report's: round 3, where issue 30's client-CPU
    # target is decided). Not hashed: a round's score changes no other number, and a finished cell without one is
    # topped up from the Λ it kept for every round (:func:`ifedicl.evaluation.methods_i2cl.score_kept_rounds`).
    also_scored_rounds: list[int] = field(default_factory=list)
    # How every task's data is read, where it differs from DATA_DEFAULTS: text_field, label_field, split, test_split
    # (kernel.sources.DataSource's fields, the flags of the same names).
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if float(self.local_epochs).is_integer():  # 1.0 from a float flag: the same cell (hash) as 1
            self.local_epochs = int(self.local_epochs)

    def objective_for(self, method: str) -> str:
        """The loss ``method`` trains with under these settings."""
        if self.objective is not None:
            return self.objective
        return "label-only" if method == "fedavg_lora" else "full-vocab"

    def calibration(self, method: str, **fields):
        """The CalibrationConfig a Λ method trains with: the recipe's fields over I2CL's defaults."""
        from ifedicl.federation_job.client import CalibrationConfig

        recipe = {k: v for k, v in self.recipe.items() if k not in HARNESS_RECIPE_KEYS}
        for flag, name in (("calib_batch_size", "batch_size"), ("prior_correction", "prior_correction")):
            if flag in self.federation:  # ``eval --calib-batch-size`` / ``--prior-correction``, as ``federate``
                recipe.setdefault(name, self.federation[flag])
        return CalibrationConfig(**{**recipe, "objective": self.objective_for(method), **fields})

    def validate(self) -> None:
        from ifedicl.federation_job.objective import OBJECTIVES

        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {list(OBJECTIVES)} (got {self.objective!r})")
        from ifedicl.federation_job.client import EPOCHS_RULE, CalibrationConfig, valid_epochs

        allowed = {f.name for f in dataclasses.fields(CalibrationConfig)} - {"epochs", "objective", "round_index"}
        wrong = sorted(set(self.recipe) - allowed - set(HARNESS_RECIPE_KEYS))
        if wrong:
            raise ValueError(
                f"unknown recipe field(s) {wrong}; choose from {sorted(allowed | set(HARNESS_RECIPE_KEYS))}"
            )
        for name, allowed_values in (("scored_rounds", SCORED_ROUNDS), ("client_test", CLIENT_TESTS)):
            if getattr(self, name) not in allowed_values:
                raise ValueError(f"{name} must be one of {list(allowed_values)} (got {getattr(self, name)!r})")
        if self.recipe.get("recalibrate", "warm") not in RECALIBRATION_STARTS:
            raise ValueError(f"recipe 'recalibrate' must be one of {list(RECALIBRATION_STARTS)}")
        from ifedicl.kernel.modeling import DTYPES

        if self.inference_dtype is not None and self.inference_dtype not in DTYPES:
            raise ValueError(f"inference dtype must be one of {sorted(DTYPES)} (got {self.inference_dtype!r})")
        from ifedicl.federation_job.options import FederationOptions

        FederationOptions(**self.federation)  # an unknown name fails here, before any cell runs
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not self.tasks:
            raise ValueError("give at least one task directory or HF dataset")
        for ok, message in (
            (self.clients >= 1, "--clients must be >= 1"),
            (all(a > 0 for a in self.alphas) and self.alphas, "--alpha must be > 0"),
            (self.rounds >= 1, "--rounds must be >= 1"),
            (self.seeds, "--seeds must be >= 1"),
            (self.test_size >= 1, "--test-size must be >= 1"),
            (self.shots >= 1, "--shots must be >= 1"),
            (
                all(type(r) is int and r >= 0 for r in self.also_scored_rounds),
                f"also_scored_rounds must be round numbers >= 0 (got {self.also_scored_rounds!r})",
            ),
            (
                self.client_test == "full" or self.test_size >= self.clients,
                "client_test 'split' gives each client its own slice of the test set: --test-size must be >= --clients",
            ),
            (valid_epochs(self.local_epochs), f"--local-epochs must be {EPOCHS_RULE}"),
            (
                self.rounds * self.local_epochs >= 1,
                "--rounds × --local-epochs must be at least one pass (I2CL central and local-only train that many "
                "epochs, the last one whole or in part)",
            ),
        ):
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def federation_for_hash(self, method: str | None = None, num_classes: int | None = None) -> dict:
        """The federation flags by their effective values, less those equal to :data:`FEDERATION_HASH_BASELINE`
        and, for a method other than IFed-ICL, less what only IFed-ICL's run reads (:data:`IFEDICL_ONLY_FIELDS`).

        ``num_classes``: the cell's task's, so ``--curvature auto`` is named by what it computes there (a binary
        cell's exact curvature hashes as it did before auto existed); None: named as the rule."""
        from ifedicl.federation_job.vector_coding import default_coding

        defaults = {name: getattr(FEDERATION, name) for name in FEDERATION_HASH_BASELINE if name != "vector_coding"}
        effective = {**defaults, **self.federation}
        if effective.get("vector_coding") is None:
            effective["vector_coding"] = default_coding(bool(effective.get("secagg")))
        if method is not None and method != "ifedicl":
            effective = {k: v for k, v in effective.items() if k not in IFEDICL_ONLY_FIELDS}
        if effective.get("stage2") != "gauss-newton":  # local steps read none of the trust region's settings
            effective = {k: v for k, v in effective.items() if k == "stage2" or k not in LAMBDA_ROUND_FIELDS}
        elif effective.get("step_check") == "model":
            effective = {k: v for k, v in effective.items() if k not in LOSS_CHECK_FIELDS}  # no round reads them
        if num_classes is not None and "curvature" in effective:
            chosen = resolve_curvature(
                effective["curvature"], effective["curvature_memory"], num_classes, effective["curvature_fraction"]
            )
            effective["curvature"], effective["curvature_memory"] = chosen.curvature, chosen.memory
            effective["curvature_fraction"] = chosen.fraction
        return {
            k: v for k, v in effective.items() if k not in FEDERATION_HASH_BASELINE or FEDERATION_HASH_BASELINE[k] != v
        }

    def cell_hash(self, method: str | None = None, num_classes: int | None = None) -> str:
        """Hash of the settings ``method``'s cells depend on (not which tasks/α/seeds/methods were asked for) on a
        task of ``num_classes`` labels (None: not known); a prompt-only method's leaves out :data:`TRAINING_ONLY`,
        one that trains alone names its passes."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("tasks", "alphas", "seeds", "methods")}
        data.pop("threads")
        data.pop("also_scored_rounds")
        data["federation"] = self.federation_for_hash(method, num_classes)
        for optional in ("recipe", "inference_dtype", "federation", "data"):
            if not data[optional]:
                del data[optional]  # the defaults: the same hash as before these settings existed
        for name, readers in SCORING_READERS.items():
            if data[name] == SCORING_DEFAULTS[name] or (method is not None and method not in readers):
                del data[name]  # the full scoring, or a method that never reads it: the hash it had before
        if method in PROMPT_ONLY:
            data = {k: v for k, v in data.items() if k not in TRAINING_ONLY}
        if method in TRAINS_ALONE:
            passes = data.pop("rounds") * data.pop("local_epochs")
            data["passes"] = int(passes) if float(passes).is_integer() else passes
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# What the federation computed with when the cell hash first covered it. A default changed since enters the
# hash as its effective value (a new default makes older cells stale); naming this value keeps them current.
# stage2: the cells before the second-order round became the default (issue 30) moved Λ by local AdamW steps;
# step_check_*: before the sampled loss check with a confidence test did, the trust region checked every row;
# curvature*: before --curvature auto did, it took the exact curvature with no memory; stage1_examples: every
# client's stage 1 took every example.
FEDERATION_HASH_BASELINE = {
    "vector_coding": "float32",
    "stage2": "local-steps",
    "step_check_fraction": 1.0,
    "step_check_confidence": 0.0,
    "curvature": "exact",
    "curvature_memory": 0.0,
    "curvature_fraction": 1.0,
    "stage1_examples": 0,
    "trust_radius": 0.5,
    "step_ridge": 0.0,
    "remember_undone": True,
}


SCORED_ROUNDS: tuple[str, ...] = get_args(ScoredRounds)
CLIENT_TESTS: tuple[str, ...] = get_args(ClientTest)
# Which methods read each scoring density, and its full (default) value: only those cells' hashes name a sparser one.
SCORING_READERS = {"scored_rounds": FEDERATED, "client_test": PER_CLIENT}
SCORING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalSettings) if f.name in SCORING_READERS}


def scored_rounds(rounds: list[int], density: str, also: list[int] = ()) -> list[int]:
    """The rounds (of ``rounds``, sorted) a federated cell scores: all, or 0, 1, 2, 4, 8, … and the last; and
    those of ``also`` it has."""
    if density == "every" or not rounds:
        return list(rounds)
    last = rounds[-1]
    return [r for r in rounds if r == last or r == 0 or (r & (r - 1)) == 0 or r in also]


def rounds_to_score(settings: EvalSettings, record: dict) -> list[int]:
    """The rounds of ``settings.also_scored_rounds`` a finished IFed-ICL cell kept Λ for but did not score (nor
    tried to: a round whose run had left the store is not tried again)."""
    kept = {int(r) for r in record.get("coefficients_by_round", {})}
    scored = {p["round"] for p in record.get("per_round", [])}
    tried = {r for later in record.get("scored_later", []) for r in later["rounds"]}
    return sorted((set(settings.also_scored_rounds) & kept) - scored - tried)


# How a task's data is read unless EvalSettings.data says otherwise (DataSource's defaults).
DATA_DEFAULTS = {"text_field": "text", "label_field": "label", "split": None, "test_split": None}


@dataclass(frozen=True)
class Cell:
    method: str
    task: str  # the task's location as given (dir or dataset name)
    alpha: float | None
    seed: int

    @property
    def key(self) -> str:
        alpha = "na" if self.alpha is None else f"{self.alpha:g}"
        # The task's last path component: a cell computed from /a/data/subj is the same cell as from
        # /b/data/subj (the settings hash says whether the numbers are comparable), so committed cells resume anywhere.
        name = self.task.rstrip("/").rsplit("/", 1)[-1] or self.task
        safe_task = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
        return f"{self.method}__{safe_task}__a{alpha}__s{self.seed}"


def plan_cells(settings: EvalSettings) -> list[Cell]:
    """Every cell of the run, in the order they are computed."""
    cells = []
    for task in settings.tasks:
        for method in METHODS:
            if method not in settings.methods:
                continue
            alphas = [None] if method in SPLIT_FREE else settings.alphas
            for alpha in alphas:
                for seed in settings.seeds:
                    cells.append(Cell(method, task, alpha, seed))
    return cells
