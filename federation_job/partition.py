"""Non-IID client splits: Dirichlet(α) label skew, as in the paper."""

from __future__ import annotations

import numpy as np

from ifedicl.kernel.errors import DataError


def dirichlet_partition(
    labels: list[int],
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[list[int]]:
    """Split example indices over clients with per-class Dirichlet(α) proportions.

    Every index lands in exactly one shard. Draws are redone (same seed stream)
    until every shard has at least ``min_size`` examples. Small α = strong skew.
    """
    if num_clients < 1:
        raise DataError(f"need at least 1 client, got {num_clients}")
    if alpha <= 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    if len(labels) < num_clients * min_size:
        raise DataError(f"{len(labels)} examples cannot give {num_clients} clients at least {min_size} each")
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels_arr):
            members = np.flatnonzero(labels_arr == cls)
            rng.shuffle(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.extend(int(i) for i in part)
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples over {num_clients} clients gave every "
        f"client {min_size}+ examples in {max_tries} draws; raise alpha or lower --min-shard"
    )
