"""Forward-only (SPSA) gradients of Λ against the backward pass a round already takes: quality per CPU second.

Issue 30's most ambitious candidate is to calibrate without autograd: estimate the 4L-dimensional gradient of
the label-only loss from paired forward passes at Λ ± εz (z a random ±1 direction), batched as rows with their
own Λ, as the patched vLLM engine batches tasks. Before building that path, this measures what it would buy, in
one process, on one client's window of real examples:

- the exact gradient g (the one a second-order round uploads, with its matrix) and its CPU seconds, for the
  default round on this task (``--curvature auto``: exact up to 3 classes, empirical from 4);
- one forward pass over the window without a graph: the unit an SPSA estimate pays 2K of;
- SPSA with K direction pairs, K = 1, 4, 16, 64, ...: its CPU seconds, and the cosine between its estimate and
  g (mean ± sd over ``--draws`` seeds). A step along an estimate with cosine c decreases the loss, to first
  order, by c² of what the same-length step along g does.

Every row is computed in float32 on this CPU; the ratio of CPU seconds is what would carry to another engine
only if that engine's forward and backward passes sped up alike. Prints figures, asserts nothing.

    python bench/zeroth_order.py --model smollm2-135m --task ../shared/data/subj --examples 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from client_window import ClientWindow, add_window_flags

from ifedicl.federation_job.client import Client
from ifedicl.federation_job.options import resolve_curvature
from ifedicl.federation_job.second_order import curvature_stats
from ifedicl.model_patches.inference import label_logits
from ifedicl.model_patches.injection import InjectionTables


def timed(work, *args):
    """(result, process CPU seconds) of one call ``work(*args)``."""
    start = time.process_time()
    result = work(*args)
    return result, time.process_time() - start


def mean_losses(
    client: Client,
    vectors: torch.Tensor,  # [L, 2, d]
    coefficients: list[torch.Tensor],  # R × [L, 2, 2]: every row's Λ
    rows: list[int],
    batch_size: int,
) -> torch.Tensor:
    """The window's mean label-only loss under each of the R Λ -> [R], every example evaluated under every Λ in
    the same batches (rows of the injection table), without a graph."""
    tables = InjectionTables.build([vectors] * len(coefficients), coefficients)
    per_coefficient = len(coefficients)
    total = torch.zeros(per_coefficient, dtype=torch.float64)  # [R]
    examples_per_batch = max(1, batch_size // per_coefficient)
    with torch.no_grad():
        for start in range(0, len(rows), examples_per_batch):
            batch = rows[start : start + examples_per_batch]
            prompts = [client.task.prompt(client.data.texts[i]) for i in batch for _ in range(per_coefficient)]
            task_row = torch.arange(1, per_coefficient + 1).repeat(len(batch))  # [B·R] example-major
            classes = torch.as_tensor([client.data.labels[i] for i in batch]).repeat_interleave(per_coefficient)
            logits = label_logits(client.ctx, client.tokenizer, prompts, client.label_ids, tables, task_row)[1]
            losses = torch.nn.functional.cross_entropy(logits.double(), classes, reduction="none")  # [B·R]
            total += losses.view(len(batch), per_coefficient).sum(0)
    return total / len(rows)


def spsa_gradient(
    client: Client,
    vectors: torch.Tensor,
    center: torch.Tensor,  # [L, 2, 2] Λ
    pairs: int,
    epsilon: float,
    seed: int,
    rows: list[int],
    batch_size: int,
) -> np.ndarray:
    """(1/K) Σₖ (L(Λ + εzₖ) − L(Λ − εzₖ)) / 2ε · zₖ, zₖ ∈ {±1}^P drawn from ``seed`` -> [P]."""
    draws = torch.Generator().manual_seed(seed)
    directions = (torch.randint(0, 2, (pairs, *center.shape), generator=draws) * 2 - 1).float()  # [K, L, 2, 2]
    coefficients = [center + sign * epsilon * z for z in directions for sign in (1.0, -1.0)]  # 2K × [L, 2, 2]
    losses = mean_losses(client, vectors, coefficients, rows, batch_size).view(pairs, 2)  # [K, (+, −)]
    slopes = (losses[:, 0] - losses[:, 1]) / (2 * epsilon)  # [K]
    return (slopes[:, None] * directions.reshape(pairs, -1).double()).mean(0).numpy()  # [P]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_window_flags(parser, examples=16)
    parser.add_argument("--pairs", default="1,4,16,64", help="comma-separated K: direction pairs per estimate")
    parser.add_argument("--draws", type=int, default=3, help="seeds per K (the cosine's spread)")
    parser.add_argument("--epsilon", type=float, default=1e-3, help="the perturbation's size on each coefficient")
    args = parser.parse_args()
    window = ClientWindow.from_flags(args)
    client, rows = window.client, window.rows
    vectors, start = torch.from_numpy(window.vectors), torch.from_numpy(window.start)  # [L, 2, d], [L, 2, 2]
    classes = len(window.task.labels)
    curvature = resolve_curvature("auto", None, classes).curvature

    exact, exact_seconds = timed(  # every row's matrix: the SPSA estimate is compared with the exact gradient
        lambda: curvature_stats(client, vectors.numpy(), start.numpy(), rows, None, args.batch_size, curvature)
    )
    _, forward_seconds = timed(lambda: mean_losses(client, vectors, [start], rows, args.batch_size))
    print(
        f"{args.model} on {window.task.name} ({classes} classes), {len(rows)} examples, P = {start.numel()}, "
        f"ε = {args.epsilon:g}, {args.threads} thread(s)"
    )
    print(f"the default round's statistics ({curvature} curvature): {exact_seconds:.2f} CPU s")
    print(f"one forward pass over the window, no graph: {forward_seconds:.2f} CPU s")
    print(f"{'K pairs':>8} {'forwards':>9} {'CPU s':>8} {'× round':>8} {'cos(ĝ, g)':>14}")
    for pairs in [int(k) for k in args.pairs.split(",") if k.strip()]:
        cosines, seconds = [], []
        for draw in range(args.draws):
            rows_per_batch = args.batch_size * 2 * pairs  # batch_size examples, each under every ±εz
            estimate, spent = timed(
                spsa_gradient, client, vectors, start, pairs, args.epsilon, draw, rows, rows_per_batch
            )
            cosines.append(cosine(estimate, exact.gradient))
            seconds.append(spent)
        spread = statistics.stdev(cosines) if len(cosines) > 1 else 0.0
        median = statistics.median(seconds)
        print(
            f"{pairs:>8} {2 * pairs:>9} {median:>8.2f} {median / exact_seconds:>8.2f} "
            f"{statistics.mean(cosines):>8.3f} ± {spread:.3f}"
        )


if __name__ == "__main__":
    main()
