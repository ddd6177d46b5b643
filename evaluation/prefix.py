"""Few-shot scoring with the shared demonstrations computed once (a prefix key/value cache).

Few-shot and local ICL prompt every test example with the same k demonstrations
(``demo_1 … demo_k template(x)``), so ~80% of each prompt's tokens are the same for
every test example. Here the demonstrations' keys and values are computed once per
prefix and every query runs only its own tokens on top of them (right-padded batches,
positions continuing after the prefix): the same tokens, the same positions and the
same causal attention as the full prompt, so the same logits within float tolerance.

Exactness is checked per prompt: a query is scored on the cache only where the
tokenizer splits ``prefix + query`` into ``tokens(prefix) + tokens(query)`` (no token
spans the boundary); any other prompt falls back to a full forward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import predict_proba


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@torch.no_grad()
def prefix_cache(model, prefix_ids: list[int]):
    """The prefix's key/value cache (batch 1)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([prefix_ids], device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    return out.past_key_values


@torch.no_grad()
def _cached_label_logits(model, cache, prefix_len: int, queries: list[list[int]], label_ids, pad_id: int):
    """Label-word logits [B, C] at each query's last token, continuing from ``cache`` (not modified)."""
    device = next(model.parameters()).device
    width = max(len(q) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(queries), width), dtype=torch.long, device=device)
    for i, q in enumerate(queries):
        ids[i, : len(q)] = torch.as_tensor(q)
        mask[i, : len(q)] = 1
    full_mask = torch.cat([torch.ones((len(queries), prefix_len), dtype=torch.long, device=device), mask], dim=1)
    positions = prefix_len + (mask.cumsum(dim=1) - 1).clamp(min=0)
    batch_cache = copy.deepcopy(cache)
    batch_cache.batch_repeat_interleave(len(queries))
    last = mask.sum(dim=1) - 1  # [B]
    keep = torch.unique(last)
    out = model(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=positions,
        past_key_values=batch_cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    rows = torch.arange(len(queries), device=device)
    logits = out.logits[rows, torch.searchsorted(keep, last)].float()
    return logits[:, torch.as_tensor(list(label_ids), device=device)]


@torch.no_grad()
def predict_proba_shared_prefix(
    ctx: HFContextModel,
    tokenizer,
    prefixes: Sequence[str],
    queries: Sequence[str],
    label_ids: Sequence[int],
    batch_size: int = 16,
    stats: dict | None = None,
) -> np.ndarray:
    """Softmax over the label words for the prompts ``prefixes[i] + queries[i]``: [N, C] float64.

    Prompts are grouped by prefix; each group's prefix runs once. ``stats`` (if given)
    counts ``cached`` and ``fallback`` prompts and the ``prefix_tokens_saved``.
    """
    n = len(queries)
    probs = np.zeros((n, len(label_ids)))
    fallback: list[int] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups: dict[str, list[int]] = {}
    for i, prefix in enumerate(prefixes):
        groups.setdefault(prefix, []).append(i)
    saved = 0
    for prefix, rows in groups.items():
        if not prefix:
            fallback += rows
            continue
        prefix_ids = _ids(tokenizer, prefix, special=True)
        usable: list[tuple[int, list[int]]] = []
        for i in rows:
            q = _ids(tokenizer, queries[i], special=False)
            if q and _ids(tokenizer, prefix + queries[i], special=True) == prefix_ids + q:
                usable.append((i, q))
            else:
                fallback.append(i)
        if not usable:
            continue
        cache = prefix_cache(ctx.model, prefix_ids)
        usable.sort(key=lambda item: len(item[1]))  # similar lengths together: little padding
        for start in range(0, len(usable), batch_size):
            batch = usable[start : start + batch_size]
            logits = _cached_label_logits(ctx.model, cache, len(prefix_ids), [q for _, q in batch], label_ids, pad_id)
            p = torch.softmax(logits.double(), dim=-1).cpu().numpy()
            for (i, _), row in zip(batch, p):
                probs[i] = row
        saved += len(prefix_ids) * (len(usable) - 1)
    if fallback:
        prompts = [prefixes[i] + queries[i] for i in fallback]
        probs[fallback] = predict_proba(ctx, tokenizer, prompts, label_ids, batch_size=batch_size)
    if stats is not None:
        stats["cached"] = stats.get("cached", 0) + n - len(fallback)
        stats["fallback"] = stats.get("fallback", 0) + len(fallback)
        stats["prefix_tokens_saved"] = stats.get("prefix_tokens_saved", 0) + saved
    return probs
