"""What a federation run is asked to do, and the strategies those settings build.

Why its own module: the CLI, the evaluation grid and recalibration construct
:class:`FederationSettings`, and :func:`build_strategies` is the one place that turns
its aggregation fields into strategy objects (the driver never dispatches on a string).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ifedicl.federation_job.class_balanced import ESTIMATORS
from ifedicl.federation_job.client import EPOCHS_RULE, CalibrationConfig, valid_epochs
from ifedicl.federation_job.objective import OBJECTIVES
from ifedicl.federation_job.options import LAMBDA_ROUND_FIELDS, FederationOptions, resolve_curvature
from ifedicl.federation_job.privacy import PrivacySettings
from ifedicl.federation_job.robust import AGGREGATORS, CoordinateMedian, NormScreen, Screened, TrimmedMean
from ifedicl.federation_job.secagg import MIN_COHORT, SecureFedAvg, Transport
from ifedicl.federation_job.second_order import (
    CURVATURE_CHOICES,
    STAGE2_METHODS,
    STEP_CHECKS,
    TrustRegionNewton,
    TrustRegionSettings,
)
from ifedicl.federation_job.server_optimizer import ServerOptimizerSettings, server_optimizer
from ifedicl.federation_job.strategies import ClientSelection, FedAvg, Strategy
from ifedicl.federation_job.tail_average import tail_average
from ifedicl.federation_job.vector_coding import CODINGS, default_coding
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.modeling import DTYPES

DEFAULTS = FederationOptions()


@dataclass
class FederationSettings:
    # The defaults a user sees are declared once, in FederationOptions (the flags, --config, the harness).
    clients: int = DEFAULTS.clients
    actors: int | None = DEFAULTS.actors  # hosts the clients are spread over (None: one per free CPU)
    alpha: float = 0.5
    rounds: int = DEFAULTS.rounds
    local_epochs: float = DEFAULTS.local_epochs  # whole passes, or a fraction of the shard per round
    fraction: float = DEFAULTS.fraction  # of alive clients sampled per round
    min_clients: int = DEFAULTS.min_clients
    round_timeout_s: float = DEFAULTS.round_timeout
    load_timeout_s: float | None = None  # for each client to load the model (None: round_timeout_s)
    seed: int = 0
    min_shard: int = DEFAULTS.min_shard
    weighted_vectors: bool = DEFAULTS.weighted  # paper: unweighted
    weighted_coefficients: bool = DEFAULTS.weighted  # paper: unweighted
    capture_batch_size: int = 8
    stage1_examples: int | None = DEFAULTS.stage1_examples or None  # v_k from at most this many examples (None: all)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    weights: str = DEFAULTS.weights  # shared: one object-store copy per node; per-actor: each loads its own
    cpus_per_client: float | None = DEFAULTS.cpus_per_client  # per host; default: the free CPUs split over hosts
    gpus_per_client: float = DEFAULTS.gpus_per_client
    dtype: str = "float32"  # weights; calibration needs float32 (I2CL)
    stage1: str = DEFAULTS.stage1  # mean of client means (the paper) | class-balanced (class_balanced.py)
    stage2: str = DEFAULTS.stage2  # local-steps (clients calibrate, server averages) | gauss-newton (second_order.py)
    curvature: str = DEFAULTS.curvature  # gauss-newton: auto | exact | sampled (options.resolve_curvature)
    curvature_memory: float | None = DEFAULTS.curvature_memory  # gauss-newton: γ of the past rounds' models (0: none)
    curvature_fraction: float | None = DEFAULTS.curvature_fraction  # gauss-newton: rows with the matrix (None: auto)
    step_check: str = DEFAULTS.step_check  # gauss-newton: loss | model (second_order.TrustRegionNewton._decrease)
    step_check_fraction: float = DEFAULTS.step_check_fraction  # loss check: of each window (second_order.checked_rows)
    step_check_confidence: float = DEFAULTS.step_check_confidence  # loss check: TrustRegionSettings.confidence
    trust_radius: float = DEFAULTS.trust_radius  # gauss-newton: the first round's ‖step‖ bound (TrustRegionSettings)
    step_ridge: float = DEFAULTS.step_ridge  # gauss-newton: damping floor / mean eigenvalue (TrustRegionSettings)
    remember_undone: bool = DEFAULTS.remember_undone  # gauss-newton: an undone step's window joins the memory
    average_rounds: int = DEFAULTS.average_rounds  # a round publishes the mean of the last this many Λ (tail_average)
    # early stopping (early_stopping.py): each client keeps this fraction of its shard out of the rounds
    holdout_fraction: float = DEFAULTS.holdout_fraction
    patience: int = DEFAULTS.patience  # rounds without a new best pooled held-out loss before the run stops
    extract_dtype: str = DEFAULTS.extract_dtype  # stage-1 forwards under autocast, e.g. bfloat16 on GPUs
    # stage-1 upload of v_k on the wire: float32 | float16 | int8; None: int8, float32 under secagg (vector_coding)
    vector_coding: str | None = DEFAULTS.vector_coding
    aggregator: str = DEFAULTS.aggregator  # mean (FedAvg) | trimmed-mean | median, coordinate-wise, vectors and Λ
    trim_fraction: float = DEFAULTS.trim_fraction  # trimmed-mean: cut from each end
    reject_norm_factor: float = DEFAULTS.reject_norm_factor  # reject ||update - ref|| > factor * median (0: off)
    # What the server does with each round's aggregate Λ (federation_job/server_optimizer.py): sgd at lr 1 is FedAvg.
    server_optimizer: str = DEFAULTS.server_optimizer  # sgd | momentum (FedAvgM) | adam (FedAdam)
    server_lr: float = DEFAULTS.server_lr
    server_momentum: float = DEFAULTS.server_momentum
    server_warmup: int = DEFAULTS.server_warmup  # rounds of linear warm-up of the server lr
    server_decay: str = DEFAULTS.server_decay  # constant | cosine (to a tenth of the lr at the last round)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: bool = DEFAULTS.secagg  # pairwise-masked sums: the server sees no single client's vectors or Λ
    # secure aggregation's Shamir threshold: t = the smallest count above this fraction of the cohort (secagg.py)
    secagg_threshold: float = DEFAULTS.secagg_threshold
    adversaries: dict[int, str] = field(default_factory=dict)  # drills/tests: {client: "scale:50,flip"}

    def __post_init__(self) -> None:
        if self.vector_coding is None:  # resolved here, so the run's recorded settings name the coding it used
            self.vector_coding = default_coding(self.secagg)

    def validate(self) -> None:
        checks = [
            (self.clients >= 1, f"--clients must be >= 1 (got {self.clients})"),
            (self.actors is None or self.actors >= 1, f"--actors must be >= 1 (got {self.actors})"),
            (self.alpha > 0, f"--alpha must be > 0 (got {self.alpha})"),
            (self.rounds >= 0, f"--rounds must be >= 0 (got {self.rounds})"),
            (valid_epochs(self.local_epochs), f"--local-epochs must be {EPOCHS_RULE} (got {self.local_epochs})"),
            (0 < self.fraction <= 1, f"--fraction must be in (0, 1] (got {self.fraction})"),
            (1 <= self.min_clients <= self.clients, f"--min-clients must be in 1..{self.clients}"),
            (self.round_timeout_s > 0, "--round-timeout must be > 0"),
            (self.load_timeout_s is None or self.load_timeout_s > 0, "the load timeout must be > 0"),
            (self.weights in ("shared", "per-actor"), f"--weights must be shared or per-actor (got {self.weights})"),
            (self.dtype in DTYPES and self.extract_dtype in DTYPES, f"dtypes must be one of {sorted(DTYPES)}"),
            (self.calibration.batch_size >= 1, "--calib-batch-size must be >= 1"),
            (
                self.calibration.objective in OBJECTIVES,
                f"--objective must be one of {OBJECTIVES} (got {self.calibration.objective})",
            ),
            (
                self.vector_coding in CODINGS,
                f"--vector-coding must be one of {', '.join(CODINGS)} (got {self.vector_coding!r})",
            ),
            (
                not (self.secagg and self.vector_coding != "float32"),
                "--vector-coding only applies without --secagg (masked sums are fixed point: "
                f"got --vector-coding {self.vector_coding})",
            ),
            (self.capture_batch_size >= 1, "--batch-size must be >= 1"),
            (
                self.stage1_examples is None or self.stage1_examples >= 1,
                "--stage1-examples must be >= 1, or 0 for every example",
            ),
            (self.aggregator in AGGREGATORS, f"--aggregator must be one of {AGGREGATORS} (got {self.aggregator})"),
            (self.stage1 in ESTIMATORS, f"--stage1 must be one of {ESTIMATORS} (got {self.stage1!r})"),
            (
                self.stage1 == "mean"
                or (self.aggregator == "mean" and not self.secagg and not self.privacy.vector_epsilon),
                "--stage1 class-balanced goes with --aggregator mean, without --secagg or --dp-vector-epsilon "
                "(it pools each class's uploads as they are)",
            ),
            (self.stage2 in STAGE2_METHODS, f"--stage2 must be one of {STAGE2_METHODS} (got {self.stage2!r})"),
            *self._second_order_checks(),
            (0 <= self.holdout_fraction < 1, f"--holdout-fraction must be in [0, 1) (got {self.holdout_fraction})"),
            (self.patience >= 1, f"--patience must be >= 1 (got {self.patience})"),
            (self.average_rounds >= 1, f"--average-rounds must be >= 1 (got {self.average_rounds})"),
            (
                not (self.holdout_fraction and (self.privacy.vector_epsilon or self.privacy.coefficient_epsilon)),
                "--holdout-fraction reports a held-out loss that has no DP noise model: drop it or --dp-*",
            ),
            (0 <= self.trim_fraction < 0.5, "--trim-fraction must be in [0, 0.5)"),
            (self.reject_norm_factor >= 0, "--reject-norm-factor must be >= 0 (0: off)"),
            (
                not (self.aggregator != "mean" and (self.weighted_vectors or self.weighted_coefficients)),
                "--weighted only goes with --aggregator mean (robust aggregators are unweighted)",
            ),
            (
                not (self.secagg and self.aggregator != "mean"),
                "--secagg only supports --aggregator mean: robust aggregators need each update in the clear",
            ),
            (
                0.5 <= self.secagg_threshold < 1,
                f"--secagg-threshold must be in [0.5, 1) of the cohort (got {self.secagg_threshold})",
            ),
            (
                not (self.secagg and self.min_clients < MIN_COHORT),
                f"--secagg needs --min-clients >= {MIN_COHORT} (a sum of one client is its value)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise IfediclError(message)
        self.privacy.validate()
        self.server_step().validate()
        from ifedicl.federation_job.adversary import parse_modes  # imports the Ray actor class: only when needed

        for spec in self.adversaries.values():
            parse_modes(spec)

    def _second_order_checks(self) -> list[tuple[bool, str]]:
        """What --stage2 gauss-newton goes with: it steps on the pooled label-only loss of every coefficient,
        from uploads of statistics (second_order.py), so it is its own server step and has no DP noise model."""
        if self.stage2 != "gauss-newton":
            unchanged = [(getattr(self, n) == getattr(DEFAULTS, n), n) for n in LAMBDA_ROUND_FIELDS if n != "stage2"]
            return [
                *((ok, f"--{_flag(name)} applies to --stage2 gauss-newton") for ok, name in unchanged),
                (not self.holdout_fraction, "--holdout-fraction (early stopping) goes with --stage2 gauss-newton"),
            ]
        needs, other = "--stage2 gauss-newton (the default)", "; with --stage2 local-steps it"
        c = self.calibration
        return [
            (
                c.objective == "label-only",
                f"{needs} steps on the label-only loss (got --objective {c.objective}{other} applies)",
            ),
            (
                not c.prior_correction,
                f"{needs} steps on the pooled loss: --prior-correction does not apply{other} does",
            ),
            (c.modules == "both", f"{needs} calibrates both blocks (got modules {c.modules!r}{other} applies)"),
            (
                self.aggregator == "mean",
                f"{needs} pools statistics by their mean (got --aggregator {self.aggregator}{other} applies)",
            ),
            (
                not self.privacy.coefficient_epsilon,
                f"{needs} has no DP noise model for --dp-coefficient-epsilon{other} applies",
            ),
            (
                self.server_step().stateless and self.server_lr == 1,
                f"{needs} is its own server step: --server-* do not apply{other} does",
            ),
            (
                self.curvature in CURVATURE_CHOICES,
                f"--curvature must be one of {CURVATURE_CHOICES} (got {self.curvature!r})",
            ),
            (
                self.curvature_memory is None or 0 <= self.curvature_memory < 1,
                f"--curvature-memory must be in [0, 1) (got {self.curvature_memory})",
            ),
            (
                self.curvature_fraction is None or 0 < self.curvature_fraction <= 1,
                f"--curvature-fraction must be in (0, 1] (got {self.curvature_fraction})",
            ),
            (self.step_check in STEP_CHECKS, f"--step-check must be one of {STEP_CHECKS} (got {self.step_check!r})"),
            (
                TrustRegionSettings.min_radius <= self.trust_radius <= TrustRegionSettings.max_radius,
                f"--trust-radius must be in [{TrustRegionSettings.min_radius}, {TrustRegionSettings.max_radius}] "
                f"(got {self.trust_radius})",
            ),
            (
                math.isfinite(self.step_ridge) and self.step_ridge >= 0,
                f"--step-ridge must be a finite number >= 0 (got {self.step_ridge})",
            ),
            (
                0 < self.step_check_fraction <= 1,
                f"--step-check-fraction must be in (0, 1] (got {self.step_check_fraction})",
            ),
            (
                self.step_check == "loss" or self.step_check_fraction == DEFAULTS.step_check_fraction,
                "--step-check-fraction is of the rows the loss check scores: it goes with --step-check loss",
            ),
            (
                math.isfinite(self.step_check_confidence) and self.step_check_confidence >= 0,
                f"--step-check-confidence must be a finite number >= 0 (got {self.step_check_confidence})",
            ),
            (
                self.step_check == "loss" or self.step_check_confidence == DEFAULTS.step_check_confidence,
                "--step-check-confidence is about the measured decrease's error: it goes with --step-check loss",
            ),
        ]

    def server_step(self) -> ServerOptimizerSettings:
        """The server optimizer these settings ask for, over this run's rounds."""
        return ServerOptimizerSettings(
            kind=self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            warmup_rounds=self.server_warmup,
            decay=self.server_decay,
            rounds_total=self.rounds,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RoundStrategies:
    """The run's two aggregations: stage 1's context vectors (every alive client) and each round's Λ."""

    vectors: Strategy
    coefficients: Strategy


def build_strategies(settings: FederationSettings, transport: Transport, num_classes: int) -> RoundStrategies:
    """The strategies ``settings`` ask for on a task of ``num_classes`` labels (what ``--curvature auto`` reads);
    ``transport`` reaches the clients for secure aggregation."""

    def build(fraction: float, weighted: bool) -> Strategy:
        selection = ClientSelection(fraction, settings.min_clients)
        if settings.secagg:  # the server sees only the sum: nothing to screen, no robust rule
            return SecureFedAvg(transport, weighted, selection, threshold=settings.secagg_threshold)
        rule: Strategy
        if settings.aggregator == "median":
            rule = CoordinateMedian(selection)
        elif settings.aggregator == "trimmed-mean":
            rule = TrimmedMean(settings.trim_fraction, selection)
        else:
            rule = FedAvg(weighted, selection)
        return Screened(rule, NormScreen(settings.reject_norm_factor))

    return RoundStrategies(
        vectors=build(1.0, settings.weighted_vectors),  # stage 1 asks every client that loaded
        coefficients=tail_average(_round_strategy(settings, build, num_classes), settings.average_rounds),
    )


def _round_strategy(settings: FederationSettings, build, num_classes: int) -> Strategy:
    """Each round's Λ: a trust-region step on the pooled statistics (means weighted by examples: the pooled
    objective's), or the server optimizer on the aggregate of local runs. Stage 1's vectors are one mean."""
    if settings.stage2 == "gauss-newton":
        chosen = resolve_curvature(
            settings.curvature, settings.curvature_memory, num_classes, settings.curvature_fraction
        )
        trust_region = TrustRegionSettings(
            curvature=chosen.curvature,
            curvature_fraction=chosen.fraction,
            memory=chosen.memory,
            step_check=settings.step_check,
            check_fraction=settings.step_check_fraction,
            confidence=settings.step_check_confidence,
            radius=settings.trust_radius,
            ridge=settings.step_ridge,
            remember_undone=settings.remember_undone,
        )
        return TrustRegionNewton(build(settings.fraction, True), trust_region)
    return server_optimizer(build(settings.fraction, settings.weighted_coefficients), settings.server_step())


def _flag(name: str) -> str:
    """The command-line flag of a federation option: ``step_check_fraction`` -> ``step-check-fraction``."""
    return name.replace("_", "-")
