"""The federation's user-facing options, one set for every command that runs a federation.

``ifedicl federate``, ``ifedicl recalibrate`` and ``ifedicl eval`` all run the same Ray
federation, so they take the same options and build :class:`FederationSettings` the same
way, here. A recalibration therefore keeps differential privacy, secure aggregation and
robust aggregation exactly as the first run was given them (it used to drop them: its
own option list lacked those flags). The CLI declares these fields as typer options
(``ifedicl.cli.option_sets``); the evaluation harness stores the non-default ones
with its settings so that a changed option recomputes a cell.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the CLI imports this module to declare its flags: torch and Ray load only when a run starts
    from ifedicl.federation_job.federation_settings import FederationSettings
    from ifedicl.federation_job.privacy import PrivacySettings

# The values of the fixed-value flags, as the code compares them (plain strings): the CLI lists them in
# --help and refuses any other value before any work starts; tests/test_cli_usage.py checks they are
# exactly the values the federation accepts (robust.AGGREGATORS, vector_coding.CODINGS, ...).
Weights = Literal["shared", "per-actor"]
Objective = Literal["full-vocab", "label-only"]
Dtype = Literal["float32", "bfloat16", "float16"]
VectorCoding = Literal["float32", "float16", "int8"]
Aggregator = Literal["mean", "trimmed-mean", "median"]
Stage1 = Literal["mean", "class-balanced"]  # federation_job.class_balanced.ESTIMATORS
Stage2 = Literal["local-steps", "gauss-newton"]  # federation_job.second_order.STAGE2_METHODS
Curvature = Literal["auto", "exact", "sampled", "empirical"]  # federation_job.second_order.CURVATURE_CHOICES
StepCheck = Literal["loss", "model"]  # federation_job.second_order.STEP_CHECKS
ServerOptimizerKind = Literal["sgd", "momentum", "adam"]  # federation_job.server_optimizer.SERVER_OPTIMIZERS
ServerDecay = Literal["constant", "cosine"]  # federation_job.server_optimizer.DECAYS

# The options only IFed-ICL's rounds of Λ read (how a round moves Λ): FedAvg-LoRA's run leaves them at their
# defaults, and an evaluation cell of another method does not depend on them.
LAMBDA_ROUND_FIELDS = (
    "stage2",
    "curvature",
    "curvature_memory",
    "curvature_fraction",
    "step_check",
    "step_check_fraction",
    "step_check_confidence",
    "trust_radius",
    "step_ridge",
    "remember_undone",
)
# What only IFed-ICL's own run reads: its rounds of Λ, which of their Λ it publishes, and how many examples its
# clients' stage 1 takes (centralized I2CL and local-only calibration take every example: the baselines at their
# strongest).
IFEDICL_ONLY_FIELDS = (*LAMBDA_ROUND_FIELDS, "stage1_examples", "average_rounds")
# Of those, what only the trust region's loss check reads (--step-check loss).
LOSS_CHECK_FIELDS = ("step_check_fraction", "step_check_confidence")

# --curvature auto, as first measured (what it is now: the last paragraph): the exact Gauss-Newton matrix while it
# takes at most 3 backward passes (C - 1, so up to 4 classes), the sampled one (two passes) above. SmolLM2, seed 0,
# 200 test examples (docs/recipe.md): on Emotion (6 classes) sampled with memory ended at 57.0% against exact's 54.5
# for 41% less client CPU; on AG News (4) it saves one pass of three and its curve was noisier (83.0 against 85.0,
# the same peak). Without memory the drawn labels' noise stalled Emotion at 50%, hence a sampled curvature's memory
# unless one is given.
# From 3 classes, auto's exact matrix is computed on a quarter of each window's rows (the gradient on all: 1.5
# backward passes per example instead of 3 on AG News), with memory: on AG News (seed 0, 200 test examples) 87.0%
# against every row's 85.0 and sampled's 83.0, for 150 client CPU s against 205 and 172. A binary matrix comes with
# the gradient's own pass: every row.
# Above 4 classes, since issue 30's report cells: the empirical Fisher (one backward pass per example, the
# gradient's own) instead of the sampled matrix (two). SmolLM2 on Emotion, 500 test examples, seeds 0 and 1:
# FedAvg-LoRA's accuracy passed at rounds 3 and 4 for 0.31× and 0.37× its client CPU (sampled: rounds 3 and 5,
# 0.42× and about 0.65×), the whole run about three quarters of the CPU, the final accuracy 1.8 points lower
# (54.2 against 56.0; FedAvg-LoRA 50.3) (docs/recipe.md).
# From 4 classes since issue 30's AG News cells: the empirical Fisher there too (one pass instead of the quarter's
# 1.5). SmolLM2 on AG News, 500 test examples, seeds 0-2: within half of FedAvg-LoRA's client CPU 82.5% (round 5)
# against the quarter's 79.3 (round 3; LoRA's whole run 79.8), the whole run 0.96x LoRA's client CPU against 1.56x,
# the final accuracy 83.2 against 84.3 (docs/recipe.md). At 3 classes the quarter's exact matrix stays (1.25 passes).
EXACT_UP_TO_CLASSES = 3
SAMPLED_MEMORY = 0.75
EXACT_MATRIX_FRACTION = 0.25


@dataclass(frozen=True)
class CurvatureChoice:
    """What a second-order round computes on a task: the clients' matrix, the rows it is taken on, the memory."""

    curvature: str  # exact | sampled (second_order.curvature_stats)
    memory: float  # γ of the past rounds' models in each step (0: this round's window alone)
    fraction: float  # of each window's rows the matrix is computed on (second_order.curvature_rows)


def resolve_curvature(
    curvature: str, memory: float | None, num_classes: int, fraction: float | None = None
) -> CurvatureChoice:
    """What ``--curvature``, ``--curvature-memory`` and ``--curvature-fraction`` mean on a task of ``num_classes``
    labels: ``auto`` and unset values become the rules above (a given value stands). A matrix from a sample
    (drawn labels or a fraction of the rows) or the empirical Fisher is averaged over rounds by the memory unless
    one is given."""
    chosen_by_rule = curvature == "auto"
    if chosen_by_rule:
        curvature = "exact" if num_classes <= EXACT_UP_TO_CLASSES else "empirical"
    if fraction is None:
        several = chosen_by_rule and curvature == "exact" and num_classes > 2
        fraction = EXACT_MATRIX_FRACTION if several else 1.0
    if memory is None:
        memory = SAMPLED_MEMORY if curvature != "exact" or fraction < 1 else 0.0
    return CurvatureChoice(curvature, memory, fraction)


@dataclass(frozen=True)
class FederationOptions:
    """What a user chooses about a federation, by the names of its command-line flags.

    Not chosen here: the Dirichlet α and the seed (``eval`` sweeps lists of them), the data,
    and what the command does with the run (publish, compare with the live run, tabulate).
    """

    clients: int = 10
    actors: int | None = None  # host actors for the clients (None: one per free CPU); a host serves many
    rounds: int = 5
    local_epochs: float = 1  # a fraction f < 1: each round trains on the next f of the shard
    fraction: float = 1.0  # of alive clients sampled per round
    min_clients: int = 1  # a round with fewer answers fails the run
    round_timeout: float = 1800.0  # seconds a round waits; a client still silent then is dropped
    min_shard: int = 2
    weighted: bool = False  # weight vector and Λ means by client example counts (paper: unweighted)
    weights: Weights = "shared"  # shared: one object-store copy per node; per-actor: each loads its own
    cpus_per_client: float | None = None
    gpus_per_client: float = 0.0
    calib_batch_size: int = 2  # I2CL's
    # The recipe (issue 30, docs/recipe.md): the label-only loss, and each round a trust-region step on the pooled
    # loss from the clients' gradients and Gauss-Newton matrices (SmolLM2, 4 tasks, seed 0: 77.5% mean, 8-9 points
    # over local AdamW steps on Subj and Emotion, 1.2 under centralized I2CL).
    objective: Objective = "label-only"
    prior_correction: bool = False  # logit adjustment by each client's label prior in the training loss
    stage1: Stage1 = "mean"  # how the server averages the vectors: mean of client means, or class-balanced
    stage2: Stage2 = "gauss-newton"  # how each round moves Λ: a trust-region step, or local AdamW runs averaged
    # gauss-newton: the whole Jacobian (C-1 backward passes), one sampled label (two) or the empirical Fisher (one),
    # and the weight γ of the past rounds' quadratic models in each step. auto: exact up to 3 classes, empirical
    # from 4; memory None: 0.75 with an estimated matrix (drawn labels, the empirical Fisher, or a fraction of the
    # rows: it averages about four windows), else 0 (resolve_curvature).
    curvature: Curvature = "auto"
    curvature_memory: float | None = None
    # gauss-newton: of each window's rows the matrix is computed on (the gradient takes every row: one backward
    # pass each); None: ¼ for auto's exact matrix at 3 classes, else every row. A binary exact matrix comes with
    # the gradient's pass: every row whatever this says.
    curvature_fraction: float | None = None
    step_check: StepCheck = "loss"  # gauss-newton: the last step's decrease measured (loss) or from the model
    # gauss-newton, loss check: of each window's rows scored at the previous Λ, and the standard errors of that
    # measured decrease a shrink needs (0: the point estimate decides). A quarter within one standard error kept
    # the full check's accuracy on Subj for 21% less client CPU; the point test on a sampled check collapsed the
    # radius (docs/recipe.md).
    step_check_fraction: float = 0.25
    step_check_confidence: float = 1.0
    # gauss-newton: the first round's bound on ‖step‖ (λ starts at 0.1, β at 1: 0.5 moves one of SmolLM2's 120
    # coefficients by half, or all of them by 0.05); the trust region then doubles it after good steps and quarters
    # it after bad ones.
    trust_radius: float = 0.5
    # gauss-newton: a floor on each step's damping, as a fraction of the pooled curvature's mean eigenvalue (a ridge
    # toward the Λ the step starts from: shorter moves along the model's flat directions, second_order.py); 0: none.
    step_ridge: float = 0.0
    # gauss-newton with memory: whether the window measured at a step that its round undid joins the memory (its
    # model describes a Λ the run left; second_order.TrustRegionSettings.remember_undone says what it did).
    remember_undone: bool = True
    # Each round publishes the mean of the last this many rounds' Λ while the rule steps from its own (1: its own
    # Λ). Zero client cost; it smooths an accepted step that cost accuracy (tail_average.py).
    average_rounds: int = 1
    holdout_fraction: float = 0.0  # of each shard kept out of the rounds to score Λ on (early stopping; 0: off)
    patience: int = 2  # with a held-out fraction: rounds without a new best pooled held-out loss before stopping
    # Stage 1 from at most this many of each client's examples (evenly spaced: client.spaced; 0: every one).
    # The pooled mean of ten clients' vectors moves little with fewer (bench/stage1_examples.py), and stage 1 was
    # a fifth of a client's CPU by the round where IFed-ICL passes FedAvg-LoRA (docs/recipe.md).
    stage1_examples: int = 32
    extract_dtype: Dtype = "float32"
    vector_coding: VectorCoding | None = None  # stage-1 upload of v_k (None: int8; under secagg float32)
    aggregator: Aggregator = "mean"
    trim_fraction: float = 0.1
    reject_norm_factor: float = 10.0
    server_optimizer: ServerOptimizerKind = "sgd"  # the server's step on each round's aggregate Λ (sgd, lr 1: FedAvg)
    server_lr: float = 1.0
    server_momentum: float = 0.9  # momentum's μ, adam's β1
    server_warmup: int = 0  # rounds
    server_decay: ServerDecay = "constant"
    secagg: bool = False
    secagg_threshold: float = 0.5  # t = the smallest count above this fraction of the key-advertising cohort
    dp_vector_epsilon: float | None = None
    dp_vector_clip: float = 1.0
    dp_coefficient_epsilon: float | None = None
    dp_coefficient_clip: float = 0.1
    dp_delta: float = 1e-5

    def privacy(self) -> PrivacySettings:
        from ifedicl.federation_job.privacy import PrivacySettings

        return PrivacySettings(
            vector_epsilon=self.dp_vector_epsilon,
            vector_clip=self.dp_vector_clip,
            coefficient_epsilon=self.dp_coefficient_epsilon,
            coefficient_clip=self.dp_coefficient_clip,
            delta=self.dp_delta,
        )

    def settings(self, alpha: float, seed: int, **fields) -> FederationSettings:
        """The run these options describe, at Dirichlet ``alpha`` and ``seed``; ``fields`` set the rest
        (``capture_batch_size``, ``dtype``, or a whole ``calibration``)."""
        from ifedicl.federation_job.client import CalibrationConfig
        from ifedicl.federation_job.federation_settings import FederationSettings

        calibration = CalibrationConfig(
            batch_size=self.calib_batch_size,
            objective=self.objective,
            prior_correction=self.prior_correction,
        )
        return FederationSettings(
            **{
                "clients": self.clients,
                "actors": self.actors,
                "alpha": alpha,
                "rounds": self.rounds,
                "local_epochs": self.local_epochs,
                "fraction": self.fraction,
                "min_clients": self.min_clients,
                "round_timeout_s": self.round_timeout,
                "seed": seed,
                "min_shard": self.min_shard,
                "weighted_vectors": self.weighted,
                "weighted_coefficients": self.weighted,
                "calibration": calibration,
                "weights": self.weights,
                "cpus_per_client": self.cpus_per_client,
                "gpus_per_client": self.gpus_per_client,
                "stage1": self.stage1,
                "stage2": self.stage2,
                "curvature": self.curvature,
                "curvature_memory": self.curvature_memory,
                "curvature_fraction": self.curvature_fraction,
                "step_check": self.step_check,
                "step_check_fraction": self.step_check_fraction,
                "step_check_confidence": self.step_check_confidence,
                "trust_radius": self.trust_radius,
                "step_ridge": self.step_ridge,
                "remember_undone": self.remember_undone,
                "average_rounds": self.average_rounds,
                "holdout_fraction": self.holdout_fraction,
                "patience": self.patience,
                "stage1_examples": self.stage1_examples or None,
                "extract_dtype": self.extract_dtype,
                "vector_coding": self.vector_coding,
                "aggregator": self.aggregator,
                "trim_fraction": self.trim_fraction,
                "reject_norm_factor": self.reject_norm_factor,
                "server_optimizer": self.server_optimizer,
                "server_lr": self.server_lr,
                "server_momentum": self.server_momentum,
                "server_warmup": self.server_warmup,
                "server_decay": self.server_decay,
                "secagg": self.secagg,
                "secagg_threshold": self.secagg_threshold,
                "privacy": self.privacy(),
                **fields,
            }
        )

    def changed(self, exclude: tuple[str, ...] = ()) -> dict:
        """The options that differ from their defaults, by name (JSON-able: what a cell hash includes)."""
        defaults = FederationOptions()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in exclude and getattr(self, f.name) != getattr(defaults, f.name)
        }
