"""The methods scored per client (local ICL, local-only calibration): which test examples each client is
scored on, and the one cell that summarizes the clients.

``client_test="full"`` scores every client on the whole test set; ``"split"`` deals the test set out, each
client scoring its own class-stratified 1/clients. Both estimate the same number, the mean accuracy over the
clients, from the same test examples; the split costs 1/clients of the forward passes (issue 33's grid).
"""

from __future__ import annotations

import numpy as np

from ifedicl.evaluation import statistics
from ifedicl.kernel.data import Split


def client_test_indices(test: Split, clients: int, client_test: str) -> list[list[int]]:
    """The test examples each client is scored on. ``"split"``: each class's examples dealt to the clients in
    turn, the turn carried from class to class, so slices differ by at most one example and each is as
    class-balanced as the counts allow."""
    if client_test == "full":
        return [list(range(len(test)))] * clients
    slices: list[list[int]] = [[] for _ in range(clients)]
    turn = 0
    for label in sorted(set(test.labels)):
        for i, y in enumerate(test.labels):
            if y == label:
                slices[turn % clients].append(i)
                turn += 1
    return [sorted(s) for s in slices]


def per_client_cell(per_client: list[dict], test: Split, slices: list[list[int]], num_classes: int) -> dict:
    """The cell of a per-client method from each client's scoring (with its ``predictions``, which are dropped).

    Every client on the whole test set: the mean of the clients' accuracy and macro-F1, and their spread.
    Split: accuracy and macro-F1 of the pooled predictions, each test example judged by its own client (with
    equal slices the accuracy is the clients' mean); the spread is the slices' less their binomial sampling
    variance, so it estimates how far the clients' own accuracies differ, not how small the slices are.
    """
    predictions = [c.pop("predictions") for c in per_client]
    for record, rows in zip(per_client, slices):
        record["test_examples"] = len(rows)
    accuracies = [c["accuracy"] for c in per_client]
    whole = all(len(s) == len(test) for s in slices)
    if whole:
        accuracy = float(np.mean(accuracies))
        macro_f1 = float(np.mean([c["macro_f1"] for c in per_client]))
        spread = statistics.mean_std(accuracies)[1]
    else:
        pooled = np.empty(len(test), dtype=int)
        for rows, predicted in zip(slices, predictions):
            pooled[rows] = predicted
        accuracy = statistics.accuracy(pooled, test.labels)
        macro_f1 = statistics.macro_f1(pooled, test.labels, num_classes)
        sampling = np.mean([a * (1 - a) / max(len(s) - 1, 1) for a, s in zip(accuracies, slices)])
        spread = float(np.sqrt(max(float(np.var(accuracies)) - sampling, 0.0)))
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "client_accuracy_std": spread,
        "client_test": "full" if whole else "split",
        "per_client": per_client,
    }
