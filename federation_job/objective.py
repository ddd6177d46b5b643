"""The training objective every trainable method shares: Λ calibration, local-only, I2CL, FedAvg-LoRA.

Both score the label word's first token at the prompt's last position:

- ``full-vocab``: cross-entropy over the whole vocabulary (I2CL's objective, IFed-ICL's
  default). Early steps mostly lift the label words above every other token.
- ``label-only``: cross-entropy over the C label words' logits (a softmax over the
  classes only), the objective the prediction rule (argmax over label words) scores.
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
) -> torch.Tensor:
    """Mean cross-entropy of the true label word under ``objective``."""
    ids = torch.as_tensor(list(label_ids), device=logits.device)
    classes = classes.to(logits.device)
    if objective == "full-vocab":
        return torch.nn.functional.cross_entropy(logits.float(), ids[classes])
    if objective == "label-only":
        return torch.nn.functional.cross_entropy(logits.float()[:, ids], classes)
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
