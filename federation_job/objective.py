"""The training objective every trainable method shares: Λ calibration, local-only, I2CL, FedAvg-LoRA.

Both score the label word's first token at the prompt's last position:

- ``full-vocab``: cross-entropy over the whole vocabulary (I2CL's objective, IFed-ICL's
  default). Early steps mostly lift the label words above every other token.
- ``label-only``: cross-entropy over the C label words' logits (a softmax over the
  classes only), the objective the prediction rule (argmax over label words) scores.

Either can add the client's label log-prior to the label words' logits before the loss
(``log_prior``: logit adjustment). Under label skew a client otherwise spends its steps
teaching Λ its own label mix (its majority label), which the FedAvg mean then has to
cancel out; with the prior added, the local optimum is the balanced classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

OBJECTIVES = ("full-vocab", "label-only")


def label_word_loss(
    logits: torch.Tensor,  # [B, V] at the last prompt token
    classes: torch.Tensor,  # [B] class indices
    label_ids: Sequence[int],  # [C] the label words' first tokens
    objective: str = "full-vocab",
    log_prior: torch.Tensor | None = None,  # [C] the training data's label log-prior (logit adjustment)
) -> torch.Tensor:
    """Mean cross-entropy of the true label word under ``objective``."""
    ids = torch.as_tensor(list(label_ids), device=logits.device)
    classes = classes.to(logits.device)
    logits = logits.float()  # [B, V]
    if log_prior is not None:
        shift = log_prior.to(logits.device, torch.float32).expand(len(logits), len(ids))  # [B, C]
        logits = logits.index_add(1, ids, shift)
    if objective == "full-vocab":
        return torch.nn.functional.cross_entropy(logits, ids[classes])
    if objective == "label-only":
        return torch.nn.functional.cross_entropy(logits[:, ids], classes)
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")


def label_log_prior(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """log p(y) of a client's labels, add-one smoothed so that a class it never saw stays finite. -> [C]"""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double() + 1.0
    return (counts / counts.sum()).log().float()
