"""A second-order round for Λ (issue 30, candidate 4): clients send the pooled objective's curvature, the
server takes a trust-region Gauss-Newton step on it.

Why: Λ is a tiny model (4L scalars: 120 for SmolLM2), so the server can optimise the *pooled* label-only
loss directly instead of averaging local runs. Each sampled client evaluates, at the global Λ and on this
round's window of its data, the mean loss, its gradient g and the Gauss-Newton matrix G = Jᵀ H J
(J: d label logits / dΛ per example; H: the softmax cross-entropy's Hessian in the logits). Means weighted
by examples are the pooled objective's — with secure aggregation too, as they are sums — so the step does
not drift with the clients' label skew the way local steps do, and a few rounds do what many local
epochs do.

Cost, per example of the window: one forward with a copy of Λ per example in the batch (the multi-task
injection tables give each row its own Λ, so one backward yields every example's gradient) and C − 1
backward passes (the loss depends on the logits only through C − 1 differences: one for binary tasks,
as much as a training step), plus, under ``step_check="loss"``, one forward at the previous Λ for the
trust-region test. Upload: the loss twice, g and the upper triangle of G (G is symmetric: a client cannot
send an asymmetric one), float32: 29.5 KB for L = 30.

The server keeps a trust region (Moré–Sorensen, by eigendecomposition): the step minimises the quadratic
model g·s + ½ sᵀGs within ‖s‖ ≤ radius. ρ = actual / predicted decrease tests the last step on the next
round's examples: ρ < 0 rejects it (back to the previous Λ, a quarter of the radius, a new step from the
stored g and G), ρ > ¾ at the boundary doubles the radius, ρ < ¼ quarters it. The actual decrease is
either measured (``step_check="loss"``: the clients also report the loss at the previous Λ on the same
examples, one more forward pass each) or read from the new end's own statistics (``"model"``:
L(Λ − s) ≈ L(Λ) − g·s + ½ sᵀGs, exact on a quadratic, with no extra forward: a third less client CPU in
a binary round, but on Subj it stalled the trust region, docs/recipe.md). The state (radius, accepted Λ,
g, G, prediction) is stored with every round like any server optimizer's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from ifedicl.federation_job.client import Client
from ifedicl.federation_job.strategies import (
    Aggregate,
    ClientUpdate,
    Reader,
    RoundId,
    RoundUpload,
    Strategy,
    WrappedStrategy,
)
from ifedicl.federation_job.tail_average import split_state
from ifedicl.kernel.errors import FederationError
from ifedicl.model_patches.inference import label_logits, length_buckets
from ifedicl.model_patches.injection import InjectionTables

STAGE2_METHODS = ("local-steps", "gauss-newton")
STEP_CHECKS = ("loss", "model")  # how the trust region measures the last step's decrease (module docstring)
PSD_TOLERANCE = 1e-4  # an eigenvalue below -tol·max(1, ‖G‖) is not rounding: the matrix is not a Gauss-Newton one


def stats_size(num_coefficients: int, spread: bool = False) -> int:
    """Elements of one upload: loss now, loss at the previous Λ, g [P], upper triangle of G [P(P+1)/2], and
    (``spread``, for a confidence test of the last step) the measured decrease's variance."""
    return 2 + num_coefficients + num_coefficients * (num_coefficients + 1) // 2 + int(spread)


@dataclass
class CurvatureStats:
    """Means over the examples a client used: the pooled objective's pieces at the global Λ."""

    loss: float  # mean label-only cross-entropy at Λ
    previous_loss: float  # at the previous Λ (0 when there is none)
    gradient: np.ndarray  # [P] float64
    curvature: np.ndarray  # [P, P] float64, symmetric PSD
    # n × the variance of this client's measured decrease (previous_loss − loss: a mean of m paired differences,
    # variance s²/m), n its example count, the weight its upload is averaged with: the weighted mean of these over
    # clients, divided by their total count, is the variance of the pooled decrease (None: not asked for).
    decrease_variance: float | None = None

    def pack(self) -> np.ndarray:
        """-> [stats_size(P, spread)] float64: the upload (the upper triangle of G only)."""
        upper = self.curvature[np.triu_indices(len(self.gradient))]
        spread = [] if self.decrease_variance is None else [self.decrease_variance]
        return np.concatenate([[self.loss, self.previous_loss], self.gradient, upper, spread])

    @classmethod
    def unpack(cls, flat: np.ndarray, num_coefficients: int, spread: bool = False) -> CurvatureStats:
        """An upload (or a mean of uploads) -> stats; G rebuilt symmetric from its upper triangle."""
        p, size = num_coefficients, stats_size(num_coefficients, spread)
        if flat.shape != (size,):
            raise FederationError(f"curvature upload has shape {flat.shape}, expected ({size},)")
        flat = flat.astype(np.float64)
        end = stats_size(p)
        curvature = np.zeros((p, p))
        curvature[np.triu_indices(p)] = flat[2 + p : end]
        curvature = curvature + np.triu(curvature, 1).T
        variance = float(flat[end]) if spread else None
        return cls(float(flat[0]), float(flat[1]), flat[2 : 2 + p], curvature, variance)

    def check(self) -> None:
        """A Gauss-Newton matrix is positive semi-definite; losses and the decrease's variance are non-negative."""
        if self.loss < 0 or self.previous_loss < 0:
            losses = f"{self.loss:.3g}, {self.previous_loss:.3g}"
            raise FederationError(f"curvature upload reports a negative loss ({losses})")
        eigenvalues = np.linalg.eigvalsh(self.curvature)
        floor = -PSD_TOLERANCE * max(1.0, float(np.abs(eigenvalues).max()))
        if eigenvalues.min() < floor:
            lowest = f"{eigenvalues.min():.3g}"
            raise FederationError(f"curvature matrix is not positive semi-definite (eigenvalue {lowest})")
        if self.decrease_variance is not None and not self.decrease_variance >= 0:
            raise FederationError(f"curvature upload reports a negative variance ({self.decrease_variance:.3g})")


# ---------------------------------------------------------------------------------------------- client side
CURVATURES = ("exact", "sampled", "empirical")  # what a client computes
CURVATURE_CHOICES = ("auto", *CURVATURES)  # what a user may ask for (auto: options.resolve_curvature)


def curvature_stats(
    client: Client,
    vectors: np.ndarray,  # [L, 2, d] the global context vectors
    coefficients: np.ndarray,  # [L, 2, 2] the global Λ
    rows: list[int],  # this round's examples of the client's shard
    previous: np.ndarray | None = None,  # [L, 2, 2] the previous Λ, for the trust-region test
    batch_size: int = 8,
    curvature: str = "exact",
    seed: int = 0,
    check_fraction: float = 1.0,
    spread: bool = False,
    curvature_fraction: float = 1.0,
) -> CurvatureStats:
    """Mean label-only loss, gradient and Gauss-Newton matrix of Λ over ``rows`` (no training noise).

    ``previous``: also the loss at the previous Λ, for the trust region's test of the last step; on every row,
    or (``check_fraction`` < 1) on :func:`checked_rows` only, reported as the window's loss plus the paired
    difference on those rows (the same rows at both Λ: its noise is the step's, not the sample's); ``spread``:
    also that measured decrease's variance (:attr:`CurvatureStats.decrease_variance`), so the server knows how
    sure the measurement is.

    ``curvature``: ``exact`` takes C − 1 backward passes per batch (one per logit difference: the whole
    per-example Jacobian); ``sampled`` takes two whatever C: one for the exact gradient and one for
    Jᵀ(p − e_ŷ) with ŷ drawn from the model's own prediction, whose outer product is an unbiased estimate
    of JᵀHJ (H = diag p − ppᵀ is the covariance of e_ŷ). For a task with many classes that is the difference
    between a round costing several training steps and about two. ``empirical`` takes one: the gradient's own
    pass gives every example's gradient gᵢ = Jᵢᵀ(p − e_y), and Σ gᵢgᵢᵀ (the empirical Fisher) stands in for the
    matrix: (p − e_y)(p − e_y)ᵀ at the true label in place of H, its expectation over labels drawn from p. It is
    biased where the model is wrong (large residuals inflate it) and exact in expectation only where p is the
    data's own distribution; the trust region bounds the step either way.

    ``curvature_fraction`` < 1: the matrix from :func:`curvature_rows` only (their own batches), the gradient
    from every row (one backward pass for the others), so a round costs 1 + fraction × (passes − 1) backward
    passes per example instead of all of them; the matrix is those rows' mean. A binary exact matrix comes
    with the gradient's own pass, so it is taken from every row whatever the fraction.
    """
    if curvature not in CURVATURES:
        raise FederationError(f"curvature must be one of {CURVATURES} (got {curvature!r})")
    if curvature == "exact" and len(client.label_ids) == 2:
        curvature_fraction = 1.0  # the gradient's backward pass is the whole Jacobian already
    with_matrix = curvature_rows(rows, curvature_fraction, seed)
    chosen = set(with_matrix)
    rest = [i for i in rows if i not in chosen]
    batches = [(batch, True) for batch in _batches_by_length(client, with_matrix, batch_size)]
    batches += [(batch, False) for batch in _batches_by_length(client, rest, batch_size)]
    noise = _label_noise(with_matrix, len(client.label_ids), seed) if curvature == "sampled" else {}
    vec = torch.as_tensor(vectors, dtype=torch.float32, device=client.device)
    base = torch.as_tensor(coefficients, dtype=torch.float32, device=client.device)
    p = base.numel()
    gradient = torch.zeros(p, dtype=torch.float64)  # [P]
    matrix = torch.zeros(p, p, dtype=torch.float64)  # [P, P]
    checked = set(checked_rows(rows, check_fraction, seed)) if previous is not None else set()
    loss = previous_sum = checked_sum = 0.0  # sums: all rows at Λ; checked rows at the previous Λ and at Λ
    differences: list[torch.Tensor] = []  # [B'] per batch: the checked rows' loss at the previous Λ minus at Λ
    for batch, wants_matrix in batches:
        prompts = [client.task.prompt(client.data.texts[i]) for i in batch]
        classes = torch.as_tensor([client.data.labels[i] for i in batch], device=client.device)  # [B]
        mine = [j for j, i in enumerate(batch) if i in checked]  # this batch's checked rows
        if mine:
            at_previous = [torch.as_tensor(previous, dtype=torch.float32)]
            before = _label_logits(client, vec, at_previous, [prompts[j] for j in mine], per_example=False)
            before_rows = torch.nn.functional.cross_entropy(before.double(), classes[mine], reduction="none")  # [B']
            previous_sum += float(before_rows.sum())
        per_example = base.unsqueeze(0).repeat(len(batch), 1, 1, 1).requires_grad_(True)  # [B, L, 2, 2]
        logits = _label_logits(client, vec, list(per_example.unbind(0)), prompts, per_example=True)  # [B, C]
        detached = logits.detach().double()
        loss += float(torch.nn.functional.cross_entropy(detached, classes, reduction="sum"))
        if mine:
            after_rows = torch.nn.functional.cross_entropy(detached[mine], classes[mine], reduction="none")  # [B']
            checked_sum += float(after_rows.sum())
            differences.append(before_rows - after_rows)
        probs = torch.softmax(detached, dim=-1)  # [B, C]
        residual = probs - torch.nn.functional.one_hot(classes, probs.shape[1]).double()  # [B, C] dℓ/dz per example
        if not wants_matrix:
            gradient += _rows_of(logits, per_example, residual, keep=False).sum(dim=0)
            continue
        if curvature == "exact":
            batch_gradient, batch_matrix = _exact(logits, per_example, probs, residual)
        elif curvature == "empirical":
            batch_gradient, batch_matrix = _empirical(logits, per_example, residual)
        else:
            batch_noise = torch.stack([noise[i] for i in batch])  # [B, C]
            batch_gradient, batch_matrix = _sampled(logits, per_example, probs, residual, batch_noise)
        gradient += batch_gradient
        matrix += batch_matrix
    n = max(1, len(rows))
    if len(checked) == len(rows):  # every row checked: the measured mean itself
        previous_loss = previous_sum / n
    else:  # the window's loss plus the checked rows' paired difference (0 without a previous Λ)
        previous_loss = max(0.0, loss / n + (previous_sum - checked_sum) / len(checked)) if checked else 0.0
    variance = _decrease_variance(differences, len(client.data)) if spread else None
    matrix /= max(1, len(with_matrix))
    return CurvatureStats(loss / n, previous_loss, (gradient / n).numpy(), matrix.numpy(), variance)


def _batches_by_length(client: Client, rows: list[int], batch_size: int) -> list[list[int]]:
    """``rows`` in batches of similar prompt length: the statistics are sums over rows, so batching changes
    nothing but the padding, which unsorted windows of short texts (Emotion) made about a seventh of a round's work."""
    if not rows:
        return []
    prompts = [client.task.prompt(client.data.texts[i]) for i in rows]
    lengths = [len(ids) for ids in client.tokenizer(prompts)["input_ids"]]
    return [[rows[k] for k in bucket] for bucket in length_buckets(lengths, batch_size)]


def _label_noise(rows: list[int], num_classes: int, seed: int) -> dict[int, torch.Tensor]:
    """Each row's exponential noise for drawing its label (:func:`_drawn_labels`), from the round's seed in
    ``rows``' order: a row's draw does not depend on the batch it lands in, and it is the draw the rounds made
    when they drew per batch in that order (``torch.multinomial`` consumes the same stream the same way)."""
    noise = torch.empty(len(rows), num_classes).exponential_(generator=torch.Generator().manual_seed(seed))  # [N, C]
    return dict(zip(rows, noise.unbind(0)))


def _drawn_labels(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One label per row drawn from ``probs`` [B, C] (the exponential race: argmax pᵢ / Eᵢ is distributed as p,
    what ``torch.multinomial`` computes for one sample) -> [B]."""
    return (probs.float() / noise).argmax(dim=-1)


def _decrease_variance(differences: list[torch.Tensor], weight: int) -> float:
    """``weight`` × the variance of the mean of the paired differences (s²/m, sample variance s²); 0 for < 2."""
    paired = torch.cat(differences) if differences else torch.zeros(0, dtype=torch.float64)  # [m]
    if len(paired) < 2:
        return 0.0
    return weight * float(paired.var(correction=1)) / len(paired)


def checked_rows(rows: list[int], fraction: float, seed: int) -> list[int]:
    """The rows whose loss at the previous Λ tests the last step: all, or a seeded ⌈fraction·n⌉ of them (≥ 1)."""
    return _seeded_rows(rows, fraction, random.Random(seed), "the step check's fraction")


def curvature_rows(rows: list[int], fraction: float, seed: int) -> list[int]:
    """The rows the Gauss-Newton matrix is computed on: all, or a seeded ⌈fraction·n⌉ of them (≥ 1), drawn
    apart from :func:`checked_rows` (their own stream of the round's seed)."""
    return _seeded_rows(rows, fraction, random.Random(f"curvature-{seed}"), "the curvature's fraction")


def _seeded_rows(rows: list[int], fraction: float, draws: random.Random, name: str) -> list[int]:
    if not 0 < fraction <= 1:
        raise FederationError(f"{name} must be in (0, 1] (got {fraction})")
    if fraction == 1 or not rows:
        return list(rows)
    return sorted(draws.sample(list(rows), max(1, math.ceil(fraction * len(rows)))))


def _label_logits(
    client: Client, vec: torch.Tensor, coefficients: list[torch.Tensor], prompts: list[str], per_example: bool
) -> torch.Tensor:
    """Label logits [B, C]: ``per_example``, prompt b injected with ``coefficients[b]`` (differentiable per
    example); else every prompt with the one set given, without a graph (the previous Λ's loss)."""
    tables = InjectionTables.build([vec] * len(coefficients), coefficients)
    if per_example:
        task_row = torch.arange(1, len(prompts) + 1)  # [B] row b reads its own copy of Λ
        return label_logits(client.ctx, client.tokenizer, prompts, client.label_ids, tables, task_row)[1]
    task_row = torch.ones(len(prompts), dtype=torch.long)  # [B] all on row 1
    with torch.no_grad():
        return label_logits(client.ctx, client.tokenizer, prompts, client.label_ids, tables, task_row)[1]


def _rows_of(logits: torch.Tensor, per_example: torch.Tensor, weights: torch.Tensor, keep: bool) -> torch.Tensor:
    """Per-example Jᵢᵀwᵢ in one backward pass (each row has its own Λ): [B, C] weights -> [B, P]."""
    combined = (logits * weights.to(logits.dtype)).sum()
    return torch.autograd.grad(combined, per_example, retain_graph=keep)[0].reshape(len(logits), -1).double()


def _exact(logits, per_example, probs, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """g and JᵀHJ from the whole Jacobian of the C − 1 logit differences to class 0 (softmax cross-entropy sees
    nothing else): C − 1 backward passes."""
    num_classes = probs.shape[1]
    basis = torch.zeros(num_classes - 1, *logits.shape, dtype=torch.float64)  # [C-1, B, C]: e_c - e_0 per row
    for c in range(num_classes - 1):
        basis[c, :, c + 1], basis[c, :, 0] = 1.0, -1.0
    jacobian = torch.stack(
        [_rows_of(logits, per_example, basis[c], keep=c < num_classes - 2) for c in range(num_classes - 1)], dim=1
    )  # [B, C-1, P]
    reduced = probs[:, 1:]  # [B, C-1]: the differences' softmax
    gradient = torch.einsum("bcp,bc->p", jacobian, residual[:, 1:])
    hessian = torch.diag_embed(reduced) - reduced.unsqueeze(2) * reduced.unsqueeze(1)  # [B, C-1, C-1]
    return gradient, torch.einsum("bcp,bcd,bdq->pq", jacobian, hessian, jacobian)


def _sampled(logits, per_example, probs, residual, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradient (one backward) and an unbiased JᵀHJ from one label drawn per example (one more);
    ``noise`` [B, C]: the rows' draws (:func:`_label_noise`)."""
    gradient = _rows_of(logits, per_example, residual, keep=True).sum(dim=0)  # [P]
    drawn = _drawn_labels(probs, noise)  # [B]
    spread = probs - torch.nn.functional.one_hot(drawn, probs.shape[1]).double()  # [B, C]: covariance H
    rows = _rows_of(logits, per_example, spread, keep=False)  # [B, P]
    return gradient, rows.T @ rows


def _empirical(logits, per_example, residual) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradient and the empirical Fisher Σ gᵢgᵢᵀ from the same backward pass (each row's gᵢ [P])."""
    rows = _rows_of(logits, per_example, residual, keep=False)  # [B, P]
    return rows.sum(dim=0), rows.T @ rows


# ---------------------------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class TrustRegionSettings:
    curvature: str = "exact"  # what the clients compute: exact | sampled (curvature_stats)
    curvature_fraction: float = 1.0  # of each window's rows the clients compute the matrix on (curvature_rows)
    radius: float = 0.5  # initial ‖step‖ bound on Λ (λ starts at 0.1, β at 1)
    min_radius: float = 1e-3
    max_radius: float = 8.0
    # Weight γ of the past rounds' quadratic models in the step (0: this round's statistics alone). Each round's
    # window is a different sample of the clients' data; with memory the step minimises the decayed sum of every
    # window's model, each re-centred at the current Λ (g_k + G_k(Λ − Λ_k)), so it follows the objective over
    # all the data seen rather than the last window's noise.
    memory: float = 0.0
    step_check: str = "loss"  # the last step's actual decrease: loss | model (STEP_CHECKS)
    check_fraction: float = 1.0  # with the loss check: of each window's rows scored at the previous Λ too
    # Standard errors the measured decrease must clear before the radius shrinks or the step is rejected (0: the
    # point estimate decides). A ratio from a sample is noisy; the classic rule (quarter on ρ < ¼, double only on
    # ρ > ¾ at the boundary) turns that noise into a radius that collapses and never grows back (docs/recipe.md).
    confidence: float = 0.0
    # A floor on the step's damping μ, as a fraction of the curvature's mean eigenvalue (0: the plain trust-region
    # step; trust_region_step says why). The predicted decrease that ρ tests stays the undamped model's.
    ridge: float = 0.0
    # Whether a window measured at a Λ its own round undid (ρ's bound < 0) joins the memory. Its model was taken
    # where the run will not be, often far off in a region of another curvature; re-centred at the Λ the run goes
    # back to, it can swamp every other window's (Gemma-3-270M AG News seed 2: after round 3's step was undone the
    # remembered gradient was 1,300× the previous one's, and every later step was undone until the radius hit its
    # floor, docs/recipe.md). True: what the report's cells computed with.
    remember_undone: bool = True

    @property
    def spread(self) -> bool:
        """Whether the clients also upload their measured decrease's variance (the confidence test needs it)."""
        return self.confidence > 0 and self.step_check == "loss"


@dataclass
class TrustRegionState:
    radius: float
    accepted: np.ndarray | None = None  # [L, 2, 2] the Λ the last step started from
    gradient: np.ndarray | None = None  # [P] there
    curvature: np.ndarray | None = None  # [P, P] there
    predicted: float = 0.0  # the quadratic model's predicted decrease of the last step
    last_step: float = 0.0  # ‖last step‖
    # The step before the last one, as this round's clients measured it: ρ (measured decrease / predicted) and
    # ρ's upper confidence bound, which decided the radius (None until a step has been measured). Kept so a run's
    # stored states say why its radius moved (trust_region_trace), not only where it went.
    measured: tuple[float, float] | None = None
    # The decayed sum of the rounds' models (with memory): Σγᵏ·G_k [P, P], Σγᵏ·(g_k − G_k·Λ_k) [P] and Σγᵏ, so
    # the summed model's gradient at Λ is (offset + curvature_sum·Λ) / weight and its curvature curvature_sum / weight.
    curvature_sum: np.ndarray | None = None
    offset: np.ndarray | None = None
    weight: float = 0.0

    def remember(self, stats: CurvatureStats, at: np.ndarray, decay: float) -> None:
        """Adds a round's model (statistics taken at Λ = ``at``) to the decayed sum."""
        point = at.reshape(-1)
        if self.curvature_sum is None:
            self.curvature_sum, self.offset = np.zeros_like(stats.curvature), np.zeros_like(stats.gradient)
        self.curvature_sum = decay * self.curvature_sum + stats.curvature
        self.offset = decay * self.offset + stats.gradient - stats.curvature @ point
        self.weight = decay * self.weight + 1.0

    def remembered(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The summed model's (gradient [P], curvature [P, P]) at Λ = ``at``."""
        curvature = self.curvature_sum / self.weight
        return self.offset / self.weight + curvature @ at.reshape(-1), curvature

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"radius": np.asarray([self.radius]), "predicted": np.asarray([self.predicted, self.last_step])}
        if self.accepted is not None:
            arrays.update(accepted=self.accepted, gradient=self.gradient, curvature=self.curvature)
        if self.curvature_sum is not None:
            arrays.update(curvature_sum=self.curvature_sum, offset=self.offset, weight=np.asarray([self.weight]))
        if self.measured is not None:
            arrays["measured"] = np.asarray(self.measured)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> TrustRegionState:
        stepped, remembered = {"accepted", "gradient", "curvature"}, {"curvature_sum", "offset", "weight"}
        known = {"radius", "predicted", "measured"} | stepped | remembered  # measured: absent in older states
        partial = any(0 < len(group & set(arrays)) < len(group) for group in (stepped, remembered))
        if set(arrays) - known or not {"radius", "predicted"} <= set(arrays) or partial:
            raise FederationError(f"trust-region state has fields {sorted(arrays)}, expected {sorted(known)}")
        p = math.prod(shape)
        expected = {"radius": (1,), "predicted": (2,), "accepted": shape, "gradient": (p,), "curvature": (p, p),
                    "curvature_sum": (p, p), "offset": (p,), "weight": (1,), "measured": (2,)}  # fmt: skip
        values = {}
        for name, value in arrays.items():
            value = np.asarray(value, dtype=np.float64)
            if value.shape != expected[name] or not np.all(np.isfinite(value)):
                raise FederationError(f"trust-region state's {name} has shape {value.shape} or is not finite")
            values[name] = value
        if values["radius"][0] <= 0:
            raise FederationError("trust-region state's radius must be > 0")
        state = cls(float(values["radius"][0]), predicted=float(values["predicted"][0]))
        state.last_step = float(values["predicted"][1])
        if "accepted" in values:
            state.accepted, state.gradient = values["accepted"], values["gradient"]
            state.curvature = values["curvature"]
        if "weight" in values:
            if values["weight"][0] <= 0:
                raise FederationError("trust-region state's weight must be > 0")
            state.curvature_sum, state.offset = values["curvature_sum"], values["offset"]
            state.weight = float(values["weight"][0])
        if "measured" in values:
            state.measured = (float(values["measured"][0]), float(values["measured"][1]))
        return state


def trust_region_step(gradient: np.ndarray, curvature: np.ndarray, radius: float, ridge: float = 0.0) -> np.ndarray:
    """argmin_s g·s + ½ sᵀGs subject to ‖s‖ ≤ radius, G PSD: -(G + μI)⁻¹g with the smallest μ ≥ floor that fits.

    ``ridge`` > 0 raises the floor to ridge × G's mean eigenvalue (tr G / P): the step then also pays ½μ‖s‖², so
    along directions flatter than μ it moves by g/μ at most, not g/eigenvalue. Why: the accepted steps that cost
    accuracy were long moves along nearly flat directions of the pooled model, where one window's gradient noise
    picks the direction and the loss check cannot tell (docs/recipe.md)."""
    eigenvalues, basis = np.linalg.eigh(curvature)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # [P]
    along = basis.T @ gradient  # [P] the gradient in G's eigenbasis

    def step(mu: float) -> np.ndarray:
        return -(basis @ (along / (eigenvalues + mu)))

    floor = 1e-9 * max(1.0, float(eigenvalues.max()))  # keeps a flat direction's step finite
    floor = max(floor, ridge * float(eigenvalues.mean()))
    candidate = step(floor)
    if np.linalg.norm(candidate) <= radius:
        return candidate
    low, high = floor, float(eigenvalues.max()) + np.linalg.norm(gradient) / radius + 1.0  # ‖step(high)‖ < radius
    for _ in range(100):  # ‖step(μ)‖ decreases in μ: bisect (geometrically) to the boundary
        middle = math.sqrt(low * high)
        if np.linalg.norm(step(middle)) > radius:
            low = middle
        else:
            high = middle
    return step(high)


class TrustRegionNewton(WrappedStrategy):
    """The inner rule's weighted mean of the clients' curvature uploads is the pooled objective's loss, gradient
    and Gauss-Newton matrix; this object turns it into the round's Λ (a trust-region step)."""

    def __init__(self, inner: Strategy, settings: TrustRegionSettings = TrustRegionSettings()):
        super().__init__(inner)
        self.settings = settings
        self.state = TrustRegionState(settings.radius)

    def round_upload(self, coefficients: np.ndarray) -> RoundUpload:
        """Each client's statistics at Λ; the request also carries how to compute the curvature and, under
        ``step_check="loss"``, the previous Λ (its loss on the same examples measures the last step)."""
        measured = self.state.accepted is not None and self.settings.step_check == "loss"
        previous = {"previous": self.state.accepted.astype(np.float32)} if measured else {}
        shape = (stats_size(coefficients.size, self.settings.spread),)
        meta = {"curvature": self.settings.curvature}
        if self.settings.curvature_fraction < 1:
            meta["curvature_fraction"] = self.settings.curvature_fraction
        if measured and self.settings.check_fraction < 1:
            meta["check_fraction"] = self.settings.check_fraction
        if self.settings.spread:
            meta["spread"] = True
        return RoundUpload("curvature", "curvature", shape, None, previous, meta)

    def decode(
        self, answers: dict[int, object], key: str, shape: tuple[int, ...], read: Reader | None = None
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        """The inner rule's checks, then each clear-text upload's own: G positive semi-definite, losses >= 0."""
        updates, rejected = super().decode(answers, key, shape, read)
        if self.masked:
            return updates, rejected
        spread = self.settings.spread
        p = _coefficient_count(shape[0] - spread)
        kept = []
        for update in updates:
            try:
                CurvatureStats.unpack(update.values, p, spread).check()
                kept.append(update)
            except FederationError as err:
                rejected[update.client_id] = f"rejected update: client {update.client_id}: {err}"
        return kept, rejected

    def state_arrays(self) -> dict[str, np.ndarray] | None:
        return self.state.to_arrays()

    def resume(self, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
        self.state = TrustRegionState.from_arrays(arrays, shape)

    def aggregate(self, at: RoundId, updates: list[ClientUpdate], reference: np.ndarray | None = None) -> Aggregate:
        if reference is None:
            raise FederationError("a trust-region step needs the round's Λ")
        result = self.inner.aggregate(at, updates)  # a mean of statistics, not a step from Λ: no reference
        stats = CurvatureStats.unpack(result.value.astype(np.float64), reference.size, self.settings.spread)
        stats.check()  # under secure aggregation the sum is the first thing the server can check
        state, start = self.state, reference.astype(np.float64)
        gradient, curvature = stats.gradient, stats.curvature
        state.measured = None  # a round whose last step predicted nothing measures nothing
        undone = False
        if state.accepted is not None and state.predicted > 0:
            ratio = self._decrease(stats, reference) / state.predicted
            # ρ's upper confidence bound: the radius shrinks (or the step is undone) only on evidence
            optimistic = ratio + self.settings.confidence * self._error(stats, result.used) / state.predicted
            state.measured = (ratio, optimistic) if math.isfinite(ratio) and math.isfinite(optimistic) else None
            if optimistic < 0:  # the last step made the pooled loss worse: retry from where it started, closer in
                start, gradient, curvature = state.accepted, state.gradient, state.curvature
                state.radius = max(self.settings.min_radius, state.radius / 4)
                undone = True
            elif ratio > 0.75 and state.last_step >= 0.99 * state.radius:
                state.radius = min(self.settings.max_radius, state.radius * 2)
            elif optimistic < 0.25:
                state.radius = max(self.settings.min_radius, state.radius / 4)
        if self.settings.memory > 0:  # this window's model joins the sum (taken at the round's Λ; if undone, by choice)
            if self.settings.remember_undone or not undone:
                state.remember(stats, reference.astype(np.float64), self.settings.memory)
            gradient, curvature = state.remembered(start)
        step = trust_region_step(gradient, curvature, state.radius, self.settings.ridge)
        state.accepted, state.gradient, state.curvature = start, gradient, curvature
        state.predicted = float(-(gradient @ step) - 0.5 * step @ curvature @ step)
        state.last_step = float(np.linalg.norm(step))
        value = (start.reshape(-1) + step).reshape(reference.shape)  # [L, 2, 2]
        return replace(result, value=value.astype(np.float32))

    @staticmethod
    def _error(stats: CurvatureStats, used: list[ClientUpdate]) -> float:
        """The measured decrease's standard error: the pooled variance is Σ(nₖ/N)²·varₖ, which is the weighted
        mean of the uploaded nₖ·varₖ divided by N (0 when the clients were not asked for it)."""
        total = sum(update.num_examples for update in used)
        if stats.decrease_variance is None or total == 0:
            return 0.0
        return math.sqrt(stats.decrease_variance / total)

    def _decrease(self, stats: CurvatureStats, reference: np.ndarray) -> float:
        """The pooled loss's decrease over the last step s (accepted -> ``reference``) on this round's examples:
        measured at both ends, or L(Λ − s) − L(Λ) read from this round's model at Λ (no forward at the previous Λ)."""
        if self.settings.step_check == "loss":
            return stats.previous_loss - stats.loss
        step = reference.reshape(-1).astype(np.float64) - self.state.accepted.reshape(-1)  # [P]
        return float(-(stats.gradient @ step) + 0.5 * step @ stats.curvature @ step)


def trust_region_trace(states: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    """Per round, from a run's stored server states {round: arrays}: the radius its step was bounded by, the
    step's length and predicted decrease, and the previous step's measured ρ with its upper confidence bound
    (None in round 1, and in states stored before ρ was kept). [] for a run without a trust region (local steps).
    Why: a round's accuracy says where Λ went; this says whether the radius or the evidence held it back."""
    trace = []
    for round_index in sorted(states):
        arrays = split_state(states[round_index])[0]  # less a tail average's iterates
        if "radius" not in arrays:
            return []
        state = TrustRegionState.from_arrays(arrays, arrays["accepted"].shape)  # every stored round has stepped
        ratio, upper = state.measured or (None, None)
        trace.append(
            {
                "round": round_index,
                "radius": state.radius,
                "step": state.last_step,
                "predicted_decrease": state.predicted,
                "previous_ratio": ratio,
                "previous_ratio_upper": upper,
            }
        )
    return trace


def _coefficient_count(size: int) -> int:
    """P from an upload's size 2 + P + P(P+1)/2."""
    p = int((math.sqrt(9 + 8 * (size - 2)) - 3) / 2)
    if stats_size(p) != size:
        raise FederationError(f"a curvature upload of {size} values fits no Λ")
    return p
