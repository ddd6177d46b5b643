"""Which accuracy a served version really has: the run's dtype, its held-out split.

A run is calibrated and scored in one dtype (``settings.dtype``, recorded again as
``summary.dtype``). vLLM serves in whatever ``--dtype`` says (and its ``auto``
downcasts float32 checkpoints to bfloat16): label probabilities move by a few
hundredths, enough to flip borderline texts. So the server either serves in the
run's own dtype (the default, :func:`default_serving_dtype`) or re-scores the run's
held-out split through its own engine at load and reports both numbers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ifedicl.kernel.data import Split
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import Store, StoredRun

logger = logging.getLogger("ifedicl.serving")

DEFAULT_RUN_DTYPE = "float32"  # runs made before the dtype was recorded were float32 (the only default)


@dataclass(frozen=True)
class TaskQuality:
    """The accuracy a served version is known to have, and in which dtype.

    ``run_accuracy`` is what the run reported (held-out split, ``run_dtype``);
    ``serving_accuracy`` is the same split scored through this server's engine in
    ``serving_dtype`` (equal to the run's when the dtypes match; ``None`` when it could
    not be scored, ``note`` says why).
    """

    run_dtype: str
    serving_dtype: str
    run_accuracy: float | None
    serving_accuracy: float | None
    examples: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "dtype": self.serving_dtype,
            "run_dtype": self.run_dtype,
            "run_accuracy": self.run_accuracy,
            "serving_accuracy": self.serving_accuracy,
            "accuracy_examples": self.examples,
            "accuracy_note": self.note,
        }


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



async def served_quality(
    run: StoredRun, serving_dtype: str, predict: Callable[[Sequence[str]], Awaitable[list[str]]]
) -> TaskQuality:
    """``run``'s accuracy in ``serving_dtype``: its own when it was made in that dtype, else its held-out
    split re-scored by ``predict`` (texts -> predicted label words, through the serving engine under the
    run's own task row), so the number is exactly what clients of this server get."""
    made_in = run_dtype(run.summary, run.settings)
    recorded = run.summary.get("accuracy")
    recorded = float(recorded) if isinstance(recorded, int | float) and np.isfinite(recorded) else None
    examples = run.summary.get("test_examples")
    if made_in == serving_dtype:
        return TaskQuality(made_in, serving_dtype, recorded, recorded, examples, "served in the run's own dtype")
    try:
        test = await asyncio.to_thread(held_out_split, run)
    except Exception as err:
        note = f"not re-scored in {serving_dtype}: held-out split unavailable ({type(err).__name__}: {err})"
        logger.warning("ifedicl: task %s run %s (%s): %s", run.task.name, run.run_id, made_in, note)
        return TaskQuality(made_in, serving_dtype, recorded, None, None, note)
    served = accuracy(await predict(test.texts), test.labels, run.task.labels)
    note = f"held-out split re-scored in {serving_dtype} at load (run made in {made_in})"
    logger.info(
        "ifedicl: task %s run %s: accuracy %s in %s (as made), %.4f in %s (served) on %d held-out texts",
        run.task.name, run.run_id, recorded, made_in, served, serving_dtype, len(test),
    )  # fmt: skip
    return TaskQuality(made_in, serving_dtype, recorded, served, len(test), note)
