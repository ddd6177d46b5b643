"""Batched forward passes on the HF path: capture, label logits, calibration loss.

Batches are right-padded; :class:`ifedicl.model_patches.hf.HFContextModel` reads each row's
last *real* token and derives positions from the attention mask, so a batched pass
equals one-at-a-time passes within float tolerance. Extraction and scoring sort examples
by length into buckets to cut padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.injection import InjectionTables


def clip_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Differential privacy's per-example clip, applied during capture.

    Scales each row (one example's flattened contribution) to L2 norm <= ``clip_norm``. [B, F] -> [B, F].
    """
    norms = rows.norm(dim=1, keepdim=True)  # [B, 1]
    return rows * torch.clamp(clip_norm / (norms + 1e-12), max=1.0)


def encode(tokenizer, texts: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``: [B, S] each."""
    enc = tokenizer(list(texts), padding=True, return_tensors="pt", padding_side="right")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def length_buckets(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar length (sorted), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def capture_sum(
    ctx: HFContextModel,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    progress=None,
    autocast_dtype: torch.dtype | None = None,
    clip_norm: float | None = None,
) -> torch.Tensor:
    """Sum over ``texts`` of each block's output at the last token: [L, 2, d] float32.

    ``autocast_dtype`` (e.g. bfloat16 on a GPU) runs the forward passes in lower precision
    without a second copy of the weights; sums are still accumulated in float32.
    ``clip_norm`` (differential privacy) scales each example's whole [L, 2, d] contribution
    to L2 norm <= ``clip_norm`` before it enters the sum, so one example moves it by at most that.
    """
    device = next(ctx.model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    total = torch.zeros(ctx.num_layers, 2, ctx.hidden_size, dtype=torch.float32)
    for batch in length_buckets(lengths, batch_size):
        input_ids, mask = encode(tokenizer, [texts[i] for i in batch], device)
        with ctx.capturing(mask) as captured, autocast:
            ctx.forward(input_ids, mask)
        stacked = torch.stack([torch.stack(pair) for pair in captured]).float()  # [L, 2, B, d]
        if clip_norm is not None:
            rows = stacked.permute(2, 0, 1, 3).reshape(len(batch), -1)  # [B, L*2*d]
            rows = clip_rows(rows, clip_norm)
            stacked = rows.reshape(len(batch), *stacked.shape[:2], stacked.shape[3]).permute(1, 2, 0, 3)
        total += stacked.sum(dim=2).cpu()
        if progress is not None:
            progress(len(batch))
    return total


def label_logits(
    ctx: HFContextModel,
    tokenizer,
    prompts: Sequence[str],
    label_ids: Sequence[int],
    tables: InjectionTables | None = None,
    task_row: torch.Tensor | None = None,  # [B] each prompt's row in ``tables`` (0 = plain)
    noise_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocab logits [B, V] and label-word logits [B, C] at the last prompt token."""
    device = next(ctx.model.parameters()).device
    input_ids, mask = encode(tokenizer, prompts, device)
    if tables is None:
        logits = ctx.forward(input_ids, mask)
    else:
        with ctx.injecting(tables, task_row.to(device), input_ids.shape[1], noise_scale):
            logits = ctx.forward(input_ids, mask)
    logits = logits.float()
    return logits, logits[:, torch.as_tensor(list(label_ids), device=device)]


@torch.no_grad()
def predict_proba(
    ctx: HFContextModel,
    tokenizer,
    prompts: Sequence[str],
    label_ids: Sequence[int],
    tables: InjectionTables | None = None,
    task_row: Sequence[int] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Softmax over the label words' first-token logits: [N, C] float64, in the order of ``prompts``.

    ``task_row[i]`` picks prompt i's row in ``tables`` (0 = plain model). Prompts are batched by
    length (``length_buckets``): on Subj, unsorted batches of 16 padded the forward passes to twice
    the tokens and took 1.7x as long.
    """
    probs = np.zeros((len(prompts), len(label_ids)))  # [N, C]
    if not len(prompts):
        return probs
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    for batch in length_buckets(lengths, batch_size):
        batch_rows = None if tables is None else torch.as_tensor([task_row[i] for i in batch], dtype=torch.long)  # [b]
        _, label_logit = label_logits(ctx, tokenizer, [prompts[i] for i in batch], label_ids, tables, batch_rows)
        probs[batch] = torch.softmax(label_logit.double(), dim=-1).cpu().numpy()
    return probs
