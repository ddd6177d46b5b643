"""Prompt-only baselines: zero-shot, few-shot ICL (centralized) and local ICL (per client).

Local ICL is the paper's "each client few-shot with its own demos": under label
skew a client's demonstrations miss classes, which is what IFed-ICL fixes.
"""

from __future__ import annotations

import random
import time

from ifedicl.evaluation.context import MethodContext, no_communication
from ifedicl.evaluation.per_client import client_test_indices, per_client_cell
from ifedicl.evaluation.scoring import max_positions, score, score_shared_prefix
from ifedicl.evaluation.settings import Cell
from ifedicl.evaluation.tasks import PreparedTask
from ifedicl.kernel.data import Split
from ifedicl.kernel.task import TaskSpec


def select_demos(split: Split, k: int, seed: int) -> list[tuple[str, int]]:
    """k demonstrations, round-robin over the classes present (balanced where the data allows), shuffled."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(split.labels):
        by_class.setdefault(y, []).append(i)
    for pool in by_class.values():
        rng.shuffle(pool)
    chosen: list[int] = []
    while len(chosen) < min(k, len(split)):
        for c in sorted(by_class):
            if by_class[c] and len(chosen) < k:
                chosen.append(by_class[c].pop())
    rng.shuffle(chosen)
    return [(split.texts[i], split.labels[i]) for i in chosen]


def icl_parts(
    task: TaskSpec, demos: list[tuple[str, int]], texts: list[str], tokenizer, limit: int
) -> tuple[list[str], list[str]]:
    """(prefixes, queries): prompt i is ``prefixes[i] + queries[i]`` = ``demo_1 … demo_k template(x)``;
    the oldest demos are dropped if the prompt would not fit the model."""
    prefix = [task.demonstration(t, y) for t, y in demos]
    prefix_tokens = len(tokenizer("".join(prefix))["input_ids"])
    prefixes, queries = [], []
    for text in texts:
        query = task.prompt(text)
        kept = list(prefix)
        # cheap bound first: prefix + query tokens (+2 for a boundary merge / special token) fit
        if prefix_tokens + len(tokenizer(query, add_special_tokens=False)["input_ids"]) + 2 > limit:
            while kept and len(tokenizer("".join(kept) + query)["input_ids"]) > limit:
                kept.pop(0)
        prefixes.append("".join(kept))
        queries.append(query)
    return prefixes, queries


def icl_prompts(task: TaskSpec, demos: list[tuple[str, int]], texts: list[str], tokenizer, limit: int) -> list[str]:
    """``demo_1 … demo_k template(x)``; the oldest demos are dropped if the prompt would not fit the model."""
    prefixes, queries = icl_parts(task, demos, texts, tokenizer, limit)
    return [p + q for p, q in zip(prefixes, queries)]


def zero_shot(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    start = time.monotonic()
    ctx, tokenizer = mc.prompt_only()
    result = score(ctx, tokenizer, task.spec, task.test, batch_size=mc.settings.batch_size)
    return {**result, "client_seconds": 0.0, "eval_seconds": time.monotonic() - start, "comm": no_communication()}


def few_shot_icl(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    start = time.monotonic()
    ctx, tokenizer = mc.prompt_only()
    demos = select_demos(task.data.train, mc.settings.shots, cell.seed)
    prefixes, queries = icl_parts(task.spec, demos, task.test.texts, tokenizer, max_positions(mc.model))
    result = score_shared_prefix(
        ctx, tokenizer, task.spec, task.test, prefixes, queries, batch_size=mc.settings.batch_size
    )
    return {
        **result,
        "shots": len(demos),
        "client_seconds": 0.0,
        "eval_seconds": time.monotonic() - start,
        "comm": no_communication(),
    }


def local_icl(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """Each client prompts with k demos from its own shard; the reported number is the mean over clients."""
    s = mc.settings
    start = time.monotonic()
    ctx, tokenizer = mc.prompt_only()
    slices = client_test_indices(task.test, s.clients, s.client_test)
    per_client = []
    for cid, shard in enumerate(task.shards(s.clients, cell.alpha, cell.seed, s.min_shard)):
        demos = select_demos(shard, s.shots, cell.seed * 1000 + cid)
        test = task.test.subset(slices[cid])
        prefixes, queries = icl_parts(task.spec, demos, test.texts, tokenizer, max_positions(mc.model))
        result = score_shared_prefix(
            ctx, tokenizer, task.spec, test, prefixes, queries, batch_size=s.batch_size, with_predictions=True
        )
        per_client.append({"client": cid, "examples": len(shard), "classes": len(set(shard.labels)), **result})
    return {
        **per_client_cell(per_client, task.test, slices, len(task.spec.labels)),
        "client_seconds": 0.0,
        "eval_seconds": time.monotonic() - start,
        "comm": no_communication(),
    }
