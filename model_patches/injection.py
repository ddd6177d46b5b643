"""The one place that owns IFed-ICL's injection math.

Every backend (the Hugging Face hooks, the patched vLLM decoder layers) calls
:func:`inject`; nothing else multiplies a block output by beta or adds a context
vector. Keeping the math in one pure tensor function is what makes the HF
reference path and the vLLM serving path provably equivalent.

Terminology (docs/method.md):
    L layers, d hidden size, two blocks per layer: ATTN = 0, MLP = 1.
    context vectors  v      : [L, 2, d]
    coefficients     Λ      : [L, 2, 2] with [..., LAM] = λ and [..., BETA] = β
Injection for block b of layer l:  out <- β[l, b] * out + λ[l, b] * v[l, b].

Several tasks share one batch through *tables*: row 0 is "no task" (β = 1,
shift = 0), row t >= 1 is task t. Each token carries its ``task_row`` into the
table, the one name this integer has from the serving API down to here (the
engine's "slots" are these rows). A row outside the table is served as row 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ATTN, MLP = 0, 1
BLOCKS = ("attn", "mlp")
LAM, BETA = 0, 1
INIT_LAMBDA = 0.1
INIT_BETA = 1.0


def inject(
    out: torch.Tensor,  # [..., d] block output, before the residual add
    task_row: torch.Tensor,  # [...] long, per token; 0 = no injection
    beta: torch.Tensor,  # [R] per-row scale; row 0 = 1
    shift: torch.Tensor,  # [R, d] per-row λ·v; row 0 = 0
    noise_scale: float = 0.0,
) -> torch.Tensor:
    """Return ``beta[t] * out + shift[t]`` per token, t = ``task_row``.

    A row outside ``[0, R)`` reads row 0 (the plain model): a negative index would
    otherwise wrap around to another task's row (the vLLM probe row, β = 0, is the
    last one) and one past the end would raise inside the engine's forward. The
    check is elementwise tensor math, so it needs no host sync and compiles.

    ``noise_scale`` > 0 adds I2CL's training-only noise first:
    ``out += randn * ||out||_2 (per token) * noise_scale``. Inference passes 0.
    """
    if noise_scale:
        norm = out.norm(dim=-1, keepdim=True)  # [..., 1]
        out = out + torch.randn_like(out) * norm * noise_scale
    num_rows = beta.shape[0]
    in_table = (task_row >= 0) & (task_row < num_rows)  # [...]
    task_row = torch.where(in_table, task_row, torch.zeros_like(task_row))  # [...]
    scale = beta[task_row].unsqueeze(-1).to(out.dtype)  # [..., 1]
    return out * scale + shift[task_row].to(out.dtype)  # [..., d]


def initial_coefficients(num_layers: int) -> torch.Tensor:
    """Λ at the start of calibration: λ = 0.1, β = 1.0 everywhere. Shape [L, 2, 2]."""
    coeffs = torch.empty(num_layers, 2, 2, dtype=torch.float32)
    coeffs[..., LAM] = INIT_LAMBDA
    coeffs[..., BETA] = INIT_BETA
    return coeffs


@dataclass
class InjectionTables:
    """Per-layer, per-block lookup tables for a set of tasks.

    beta:  [L, 2, T+1]     row 0 = 1.0 (no task)
    shift: [L, 2, T+1, d]  row 0 = 0.0; row t = λ_t · v_t
    Built with differentiable ops, so gradients reach Λ during calibration.
    """

    beta: torch.Tensor
    shift: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.beta.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.beta.shape[2] - 1

    @property
    def hidden_size(self) -> int:
        return self.shift.shape[-1]

    @classmethod
    def build(
        cls,
        vectors: Sequence[torch.Tensor],  # T x [L, 2, d]
        coefficients: Sequence[torch.Tensor],  # T x [L, 2, 2]
    ) -> InjectionTables:
        if len(vectors) != len(coefficients):
            raise ValueError(f"{len(vectors)} vector sets but {len(coefficients)} coefficient sets")
        if not vectors:
            raise ValueError("InjectionTables.build needs at least one task")
        num_layers, _, hidden = vectors[0].shape
        for v, c in zip(vectors, coefficients):
            if tuple(v.shape) != (num_layers, 2, hidden) or tuple(c.shape) != (num_layers, 2, 2):
                raise ValueError(
                    f"task shapes disagree: vectors {tuple(v.shape)}, coefficients {tuple(c.shape)}, "
                    f"expected ({num_layers}, 2, {hidden}) and ({num_layers}, 2, 2)"
                )
        lam = torch.stack([c[..., LAM] for c in coefficients], dim=-1)  # [L, 2, T]
        beta = torch.stack([c[..., BETA] for c in coefficients], dim=-1)  # [L, 2, T]
        vec = torch.stack([v.to(lam.dtype) for v in vectors], dim=2)  # [L, 2, T, d]
        shift = lam.unsqueeze(-1) * vec  # [L, 2, T, d]
        ones = torch.ones(num_layers, 2, 1, dtype=beta.dtype, device=beta.device)
        zeros = torch.zeros(num_layers, 2, 1, hidden, dtype=shift.dtype, device=shift.device)
        return cls(beta=torch.cat([ones, beta], dim=2), shift=torch.cat([zeros, shift], dim=2))
