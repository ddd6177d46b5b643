"""A client's round, per way of moving Λ, against a FedAvg-LoRA local pass over the same examples.

Client CPU seconds are what issue 30's target compares (IFed-ICL at most half of FedAvg-LoRA's), and the
report's cells measure them inside the actors of runs computed at different times on a shared machine, where
contention inflates them unevenly. Here every method runs in this one process, on the same model, examples
and threads, interleaved over ``--repeats`` so drifting load hits each alike, and the figures are ratios to
the LoRA pass. Prints figures, asserts nothing.

- ``gauss-newton, loss check``: the statistics a second-order round uploads (loss, gradient, Gauss-Newton
  matrix of Λ at C − 1 backward passes per example) plus the loss at the previous Λ (one more forward);
- ``gauss-newton, check on ¼``: that forward on a quarter of the rows, plus the paired differences' variance
  for the confidence test (``--step-check-fraction 0.25 --step-check-confidence 1``, the default);
- ``gauss-newton sampled, check on ¼``: the same with two backward passes whatever C (``--curvature sampled``);
- ``gauss-newton empirical, check on ¼``: one backward pass whatever C, the examples' gradients' outer products
  as the matrix (``--curvature empirical``): the default round from 4 classes (``--curvature auto``; on binary
  tasks ``gauss-newton, check on ¼``, at 3 classes with the matrix on ¼);
- ``matrix on ¼`` (``⅛``): the Gauss-Newton matrix from a quarter (an eighth) of the rows, the gradient from all
  (``--curvature-fraction 0.25``): 1 + ¼ × (passes − 1) backward passes per example;
- ``gauss-newton, model check``: the same statistics without that forward (``--step-check model``);
- ``gauss-newton sampled``: two backward passes whatever C (``--curvature sampled``), model check;
- ``local steps (AdamW)``: the paper's round, one pass of I2CL's AdamW steps on Λ (batch 2);
- ``FedAvg-LoRA``: one pass of local training of rank-8 q/v adapters (batch 2), the baseline;
- ``stage 1 (vectors)``: extracting the context vectors once, the fixed cost every IFed-ICL run adds.

    python bench/client_rounds.py --model smollm2-135m --task ../shared/data/subj --examples 32
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
from client_window import ClientWindow, add_window_flags

from ifedicl.federation_job.client import CalibrationConfig
from ifedicl.federation_job.lora import LoraClient, LoraSettings, trainable_state
from ifedicl.federation_job.options import resolve_curvature
from ifedicl.federation_job.second_order import curvature_stats


def cpu_seconds(work) -> float:
    """Process CPU seconds of one call (every thread of this process)."""
    start = time.process_time()
    work()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_window_flags(parser, examples=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    window = ClientWindow.from_flags(args)
    client, rows, vectors, start = window.client, window.rows, window.vectors, window.start
    previous = start + np.float32(0.01)
    config = CalibrationConfig(epochs=1)

    def second_order(curvature: str, checked: float | None, matrix_rows: float = 1.0):
        """A round's statistics; ``checked``: the fraction of rows also scored at the previous Λ (None: none);
        ``matrix_rows``: the fraction the Gauss-Newton matrix is computed on."""
        return lambda: curvature_stats(
            client, vectors, start, rows, previous if checked else None, args.batch_size, curvature,
            check_fraction=checked or 1.0, spread=checked is not None and checked < 1,
            curvature_fraction=matrix_rows,
        )  # fmt: skip

    methods = {
        "stage 1 (vectors)": lambda: client.extract_vectors(batch_size=args.batch_size),
        "gauss-newton, loss check": second_order("exact", 1.0),
        "gauss-newton, check on ¼": second_order("exact", 0.25),
        "gauss-newton sampled, check on ¼": second_order("sampled", 0.25),
        "gauss-newton, matrix on ¼, check on ¼": second_order("exact", 0.25, 0.25),
        "gauss-newton sampled, matrix on ¼, check on ¼": second_order("sampled", 0.25, 0.25),
        "gauss-newton empirical, check on ¼": second_order("empirical", 0.25),
        "gauss-newton, matrix on ⅛, check on ¼": second_order("exact", 0.25, 0.125),
        "gauss-newton, model check": second_order("exact", None),
        "gauss-newton sampled": second_order("sampled", None),
        "local steps (AdamW)": lambda: client.calibrate(vectors, start, config, seed=0),
    }
    lora_client: LoraClient | None = None
    lora_state: dict | None = None

    def lora_pass():
        nonlocal lora_client, lora_state
        if lora_client is None:  # attaches adapters to the shared model: everything else ran without them first
            lora_client = LoraClient(client, LoraSettings())
            lora_state = trainable_state(lora_client.model)
        lora_client.train(lora_state, dataclasses.replace(config, lr=5e-4), seed=0)

    seconds: dict[str, list[float]] = {name: [] for name in [*methods, "FedAvg-LoRA"]}
    for _ in range(args.repeats):
        for name, work in methods.items():
            seconds[name].append(cpu_seconds(work))
    for _ in range(args.repeats):  # after the adapters are attached, which changes the model for the rest
        seconds["FedAvg-LoRA"].append(cpu_seconds(lora_pass))

    baseline = statistics.median(seconds["FedAvg-LoRA"])
    classes = len(window.task.labels)
    chosen = resolve_curvature("auto", None, classes)
    default = "gauss-newton" + (f" {chosen.curvature}" if chosen.curvature != "exact" else "")
    default += f", matrix on {chosen.fraction:g} of the rows" if chosen.fraction < 1 else ""
    print(f"{args.model} on {window.task.name} ({classes} classes), {len(rows)} examples, {args.threads} thread(s), "
          f"median of {args.repeats}; the default round here: {default}, check on ¼")  # fmt: skip
    print(f"{'method':<34} {'CPU s':>8} {'ms/example':>11} {'× LoRA':>8}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<34} {median:>8.2f} {1000 * median / len(rows):>11.1f} {median / baseline:>8.2f}")


if __name__ == "__main__":
    main()
