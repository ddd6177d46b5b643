"""Which accuracy a served version really has: the run's dtype, its held-out split.

A run is calibrated and scored in one dtype (``settings.dtype``, recorded again as
``summary.dtype``). vLLM serves in whatever ``--dtype`` says (and its ``auto``
downcasts float32 checkpoints to bfloat16): label probabilities move by a few
hundredths, enough to flip borderline texts. So the server either serves in the
run's own dtype (the default, :func:`default_serving_dtype`) or re-scores the run's
held-out split through its own engine at load and reports both numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

from ifedicl.kernel.data import Split
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import Store, StoredRun

DEFAULT_RUN_DTYPE = "float32"  # runs made before the dtype was recorded were float32 (the only default)


def run_dtype(summary: dict, settings: dict) -> str:
    """The dtype a run was calibrated and scored in."""
    return str(summary.get("dtype") or settings.get("dtype") or DEFAULT_RUN_DTYPE)


def default_serving_dtype(store: Store) -> str | None:
    """The dtype most published runs were made in (float32 on a tie); ``None`` with nothing published."""
    counts: dict[str, int] = {}
    for info in store.published_runs().values():
        dtype = run_dtype(info.summary, info.settings)
        counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        return None
    return max(sorted(counts), key=lambda d: (counts[d], d == DEFAULT_RUN_DTYPE))


def held_out_split(run: StoredRun) -> Split:
    """The test split the run was scored on, re-read from the data source it records."""
    source = run.settings.get("source")
    if not isinstance(source, dict) or not source.get("location"):
        raise LookupError("the run records no data source")
    task = source.get("task")
    spec = TaskSpec.from_dict(task) if isinstance(task, dict) else None
    fields = {k: v for k, v in source.items() if k in DataSource.__dataclass_fields__ and k != "task"}
    test = DataSource(**{**fields, "task": spec}).load().test
    if not len(test):
        raise LookupError(f"{source['location']} has no test split")
    return test


def accuracy(predicted: Iterable[str], labels: Iterable[int], words: tuple[str, ...]) -> float:
    pairs = [(p, words[g]) for p, g in zip(predicted, labels)]
    return sum(p == g for p, g in pairs) / len(pairs)

