"""A small sentiment task written on the spot, so the demo and tests need no download."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ifedicl.kernel.task import TaskSpec

DEMO_TASK = TaskSpec("demo-sentiment", "Review: {text}\nSentiment:", ("negative", "positive"))

_SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the cast"]
_POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "a joy to watch", "sharp and funny", "great"]
_NEGATIVE = ["dull", "tedious", "a mess", "painfully slow", "forgettable", "awful", "a waste of time"]


def make_sentiment_dir(directory: str | Path, n_train: int = 240, n_test: int = 60, seed: int = 0) -> Path:
    """Write ``task.json``, ``train.jsonl`` and ``test.jsonl`` of a two-class review task."""
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def rows(n: int):
        for _ in range(n):
            label = rng.randrange(2)
            words = (_NEGATIVE, _POSITIVE)[label]
            yield {"text": f"{rng.choice(_SUBJECTS)} was {rng.choice(words)} .", "label": label}

    (directory / "task.json").write_text(json.dumps(DEMO_TASK.to_dict(), indent=2))
    for name, n in (("train", n_train), ("test", n_test)):
        with (directory / f"{name}.jsonl").open("w") as f:
            for row in rows(n):
                f.write(json.dumps(row) + "\n")
    return directory


def corpus(task: TaskSpec, texts: list[str]) -> list[str]:
    """Texts to train a tiny tokenizer on: the data, the template and every label word."""
    return texts + [task.demonstration(t, i % len(task.labels)) for i, t in enumerate(texts)] + list(task.labels) * 20
