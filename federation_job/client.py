"""The client role: extract local context vectors, calibrate Λ locally.

Pure PyTorch, no Ray: the Ray actor (``actors.py``) is a thin wrapper that holds
one of these and speaks bytes. The LLM is frozen; only the 4L scalars of Λ are
trainable, and only they (and the vectors, once) ever leave the client.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from ifedicl.federation_job.class_balanced import class_means
from ifedicl.federation_job.objective import label_log_prior, label_word_loss
from ifedicl.kernel.data import Split
from ifedicl.kernel.task import TaskSpec, label_token_ids
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import capture_sum, label_logits, predict_proba
from ifedicl.model_patches.injection import InjectionTables


@dataclass(frozen=True)
class CalibrationConfig:
    """I2CL's defaults (docs/method.md)."""

    lr: float = 1e-2
    weight_decay: float = 1e-3
    batch_size: int = 2
    warmup_fraction: float = 0.05
    min_lr: float = 1e-5
    noise_scale: float | None = None  # training-only noise; None: the model family's (hf.BlockLayout.training_noise)
    # Passes over the local data per round. A fraction f < 1 trains on the next ⌈f·n⌉ examples of one fixed
    # order of the shard each round, so 1/f rounds make one pass: more, cheaper rounds at the same compute.
    epochs: float = 1
    objective: str = "label-only"  # or "full-vocab", I2CL's (ifedicl.federation_job.objective)
    prior_correction: bool = False  # add the local label log-prior to the label logits in the loss (objective.py)
    # "per-round": warm-up and cosine decay restart in every round (I2CL's schedule, per local run);
    # "global": one warm-up/cosine schedule across all rounds, each round continuing where the last stopped.
    schedule: str = "per-round"
    round_index: int = 1  # which round this local run is (1-based), for the global schedule
    rounds_total: int = 1
    modules: str = "both"  # which blocks Λ injects into and trains: both | attn | mlp (the other: λ=0, β=1)


SCHEDULES = ("per-round", "global")
MODULES = ("both", "attn", "mlp")


def warmup_cosine(total_steps: int, warmup_fraction: float, lr: float, min_lr: float):
    """LR multiplier: linear warm-up over the first steps, then cosine decay to ``min_lr``."""
    warmup = max(1, int(math.ceil(warmup_fraction * total_steps)))
    floor = min_lr / lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup - 1)  # last step at the floor
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


EPOCHS_RULE = "a whole number >= 1 or a fraction in (0, 1)"  # what valid_epochs accepts, for error messages


def valid_epochs(epochs: float) -> bool:
    """A whole number of passes, or a fraction of one (a window per round); nothing in between."""
    return epochs > 0 and (epochs < 1 or float(epochs).is_integer())


def round_passes(num_examples: int, config: CalibrationConfig, order_rng: random.Random) -> list[list[int]]:
    """The example indices of each pass this round, in training order.

    Whole epochs: each pass is a fresh shuffle of the shard. More than one and a fraction (a party training
    alone for as many passes as a federation's rounds of windows make: centralized I2CL at 6 × ¼ = 1.5 epochs):
    the last pass is the first part of a fresh shuffle. A fraction: one pass over this round's window
    of a fixed order of the shard (the same order every round, seeded by the shard's size, so consecutive
    rounds take consecutive windows and every example is used once per 1/f rounds).
    """
    if not (valid_epochs(config.epochs) or config.epochs > 1):
        raise ValueError(f"local epochs must be {EPOCHS_RULE}, or more than one (got {config.epochs})")
    if config.epochs >= 1:
        passes = []
        whole, part = divmod(config.epochs, 1)
        for length in [num_examples] * int(whole) + ([math.ceil(part * num_examples)] if part else []):
            order = list(range(num_examples))
            order_rng.shuffle(order)
            passes.append(order[:length])
        return passes
    fixed = list(range(num_examples))
    random.Random(num_examples).shuffle(fixed)
    window = max(1, math.ceil(config.epochs * num_examples))
    start = (max(1, config.round_index) - 1) * window
    chosen = [fixed[(start + j) % num_examples] for j in range(min(window, num_examples))]
    order_rng.shuffle(chosen)
    return [chosen]


def local_epochs(
    params: list[torch.Tensor], num_examples: int, config: CalibrationConfig, seed: int, batch_loss
) -> list[float]:
    """The local optimisation every trainable method shares (Λ, LoRA): AdamW, warm-up then cosine,
    this round's passes (:func:`round_passes`) in batches of ``config.batch_size``. -> the loss of every step.

    ``batch_loss(rows)`` is the mean loss of those example indices; the caller seeds torch.
    """
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} (got {config.schedule!r})")
    passes = round_passes(num_examples, config, random.Random(seed))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = sum(math.ceil(len(rows) / config.batch_size) for rows in passes)
    offset = 0
    if config.schedule == "global":  # this round's steps are a slice of one schedule over every round
        offset = total * (max(1, config.round_index) - 1)
        factor = warmup_cosine(total * max(1, config.rounds_total), config.warmup_fraction, config.lr, config.min_lr)
    else:
        factor = warmup_cosine(total, config.warmup_fraction, config.lr, config.min_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + offset))
    losses = []
    for order in passes:
        for start in range(0, len(order), config.batch_size):
            loss = batch_loss(order[start : start + config.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    return losses


def module_mask(modules: str, like: torch.Tensor):
    """Λ -> the Λ injected: with ``modules`` = attn (mlp), the other block is fixed at λ=0, β=1 (no injection,
    no gradient, no weight decay); ``both`` is the identity."""
    from ifedicl.model_patches.injection import BETA

    if modules not in MODULES:
        raise ValueError(f"modules must be one of {MODULES} (got {modules!r})")
    if modules == "both":
        return lambda c: c
    off = 1 if modules == "attn" else 0  # block index: 0 attention, 1 MLP
    keep = torch.ones_like(like, dtype=torch.float32)
    keep[:, off] = 0.0
    fixed = torch.zeros_like(like, dtype=torch.float32)
    fixed[:, off, BETA] = 1.0
    return lambda c: c * keep + fixed


@dataclass
class CalibrationResult:
    coefficients: np.ndarray  # [L, 2, 2]
    mean_loss: float
    steps: int


def spaced(items: list, limit: int | None) -> list:
    """At most ``limit`` of ``items``, evenly spaced from the first (None: all). Not the first ``limit``: an
    organization's file sorted by label would give its stage 1 one class; spaced rows give each run of the file
    its share, and on a shuffled file they are as good as any draw, with no seed to carry."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


class Client:
    """One organisation's private shard and the frozen model it runs."""

    def __init__(self, ctx: HFContextModel, tokenizer, task: TaskSpec, data: Split):
        self.ctx = ctx
        self.tokenizer = tokenizer
        self.task = task
        self.data = data
        self.label_ids = label_token_ids(task, tokenizer)
        self.log_prior = label_log_prior(data.labels, len(task.labels))  # [C] never leaves the client
        self.device = next(ctx.model.parameters()).device

    def extract_vectors(
        self,
        batch_size: int = 8,
        progress=None,
        autocast_dtype: torch.dtype | None = None,
        clip_norm: float | None = None,
        max_examples: int | None = None,
        rows: list[int] | None = None,
    ) -> np.ndarray:
        """Local context vector v_k: mean over demonstrations of each block's last-token output. [L, 2, d].

        ``clip_norm`` bounds each demonstration's [L, 2, d] contribution (differential privacy);
        ``max_examples`` uses only that many local examples, evenly spaced (:func:`spaced`); ``rows``: of these
        examples only (None: all; early stopping keeps its held-out rows out).
        """
        pairs = spaced(self._pairs(rows), max_examples)
        demos = [self.task.demonstration(t, y) for t, y in pairs]
        total = capture_sum(self.ctx, self.tokenizer, demos, batch_size, progress, autocast_dtype, clip_norm)
        return (total / len(demos)).numpy()

    def extract_class_means(
        self,
        batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
        max_examples: int | None = None,
        rows: list[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class-balanced stage 1 (:mod:`~ifedicl.federation_job.class_balanced`): each class's mean over its
        demonstrations here (``rows`` of them, None: all), and how many each had. -> (means [C, L, 2, d],
        counts [C] int64)."""
        pairs = spaced(self._pairs(rows), max_examples)
        classes = len(self.task.labels)
        sums = torch.zeros(classes, self.ctx.num_layers, 2, self.ctx.hidden_size)  # [C, L, 2, d]
        counts = np.zeros(classes, dtype=np.int64)  # [C]
        for c in range(classes):
            demos = [self.task.demonstration(t, y) for t, y in pairs if y == c]
            counts[c] = len(demos)
            if demos:
                sums[c] = capture_sum(self.ctx, self.tokenizer, demos, batch_size, None, autocast_dtype)
        return class_means(sums.numpy(), counts), counts

    def _pairs(self, rows: list[int] | None) -> list[tuple[str, int]]:
        """(text, label) of ``rows`` of the local data, in their order (None: every example)."""
        indices = range(len(self.data)) if rows is None else rows
        return [(self.data.texts[i], self.data.labels[i]) for i in indices]

    def calibration_loss(
        self,
        vectors: torch.Tensor,  # [L, 2, d]
        coefficients: torch.Tensor,  # [L, 2, 2], requires grad
        indices: list[int],
        noise_scale: float,
        objective: str = "label-only",
        prior_correction: bool = False,
    ) -> torch.Tensor:
        """Mean cross-entropy of the label word's first token at the prompt's last position (``objective``,
        with this client's label prior added to the logits if ``prior_correction``)."""
        prompts = [self.task.prompt(self.data.texts[i]) for i in indices]
        classes = torch.as_tensor([self.data.labels[i] for i in indices])
        tables = InjectionTables.build([vectors], [coefficients])
        task_row = torch.ones(len(indices), dtype=torch.long)  # [B]: every prompt on row 1, this client's tables
        logits, _ = label_logits(self.ctx, self.tokenizer, prompts, self.label_ids, tables, task_row, noise_scale)
        return self.label_loss(logits, classes, objective, prior_correction)

    def label_loss(
        self, logits: torch.Tensor, classes: torch.Tensor, objective: str, prior_correction: bool
    ) -> torch.Tensor:
        """The training loss of any trainable method on this client (Λ here, LoRA in ``lora.py``). [B, V] -> []"""
        return label_word_loss(logits, classes, self.label_ids, objective, self.log_prior if prior_correction else None)

    def calibrate(
        self, vectors: np.ndarray, coefficients: np.ndarray, config: CalibrationConfig, seed: int = 0
    ) -> CalibrationResult:
        """Start from the global Λ and minimise the local loss with AdamW; the LLM stays frozen."""
        torch.manual_seed(seed)
        vec = torch.as_tensor(vectors, dtype=torch.float32, device=self.device)
        coeffs = torch.nn.Parameter(torch.as_tensor(coefficients, dtype=torch.float32, device=self.device).clone())
        effective = module_mask(config.modules, coeffs)
        noise = self.ctx.layout.training_noise if config.noise_scale is None else config.noise_scale

        def batch_loss(rows: list[int]) -> torch.Tensor:
            return self.calibration_loss(vec, effective(coeffs), rows, noise, config.objective, config.prior_correction)

        losses = local_epochs([coeffs], len(self.data), config, seed, batch_loss)
        final = effective(coeffs).detach().cpu().numpy()
        return CalibrationResult(final, float(np.mean(losses)), len(losses))

    @torch.no_grad()
    def evaluate_loss(
        self,
        vectors: np.ndarray,
        coefficients: np.ndarray,
        batch_size: int = 16,
        objective: str = "label-only",
        rows: list[int] | None = None,
    ) -> float:
        """Mean label cross-entropy without noise on ``rows`` of the local shard (None: all of it)."""
        vec = torch.as_tensor(vectors, dtype=torch.float32, device=self.device)
        coeffs = torch.as_tensor(coefficients, dtype=torch.float32, device=self.device)
        rows = list(range(len(self.data))) if rows is None else rows
        losses = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            losses.append(float(self.calibration_loss(vec, coeffs, batch, 0.0, objective)) * len(batch))
        return sum(losses) / len(rows)


def class_counts(
    ctx: HFContextModel,
    tokenizer,
    task: TaskSpec,
    data: Split,
    vectors: np.ndarray | None = None,
    coefficients: np.ndarray | None = None,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (correct [C], total [C]) of argmax over label words; with vectors and Λ, injected.

    Counts, not an accuracy: federated evaluation pools them over clients, so the run's accuracy is
    that of all clients' held-out examples together, whatever each client holds.
    """
    classes = len(task.labels)
    labels = np.asarray(data.labels, dtype=np.int64)  # [N]
    total = np.bincount(labels, minlength=classes)  # [C]
    if not len(data):
        return np.zeros(classes, dtype=np.int64), total
    tables, index = None, None
    if vectors is not None:
        tables = InjectionTables.build([torch.from_numpy(vectors)], [torch.from_numpy(coefficients)])
        index = [1] * len(data)
    prompts = [task.prompt(t) for t in data.texts]
    probs = predict_proba(ctx, tokenizer, prompts, label_token_ids(task, tokenizer), tables, index, batch_size)
    hits = probs.argmax(axis=1) == labels  # [N]
    return np.bincount(labels[hits], minlength=classes), total


def accuracy(
    ctx: HFContextModel,
    tokenizer,
    task: TaskSpec,
    data: Split,
    vectors: np.ndarray | None = None,
    coefficients: np.ndarray | None = None,
    batch_size: int = 16,
) -> float:
    """Accuracy of argmax over label words; with vectors and Λ, injected."""
    if not len(data):
        return float("nan")
    correct, total = class_counts(ctx, tokenizer, task, data, vectors, coefficients, batch_size)
    return float(correct.sum() / total.sum())
