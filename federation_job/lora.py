"""FedAvg-LoRA's model work, in one place: the Ray client actors and the evaluation harness call it.

peft LoRA (rank 8 by default) on the attention query/value projections (``q_proj``,
``v_proj``; GPT-2's fused ``c_attn``). Adapters are attached *in place* to a frozen
model (peft replaces those Linear modules), so the model's forward, and the
:class:`~ifedicl.model_patches.hf.HFContextModel` wrapped around it, run with the adapters:
LoRA is trained with the same forward (last-token logits only), the same objective
options (:mod:`ifedicl.federation_job.objective`) and the same local optimisation
(:func:`ifedicl.federation_job.client.local_epochs`) as Λ calibration.

What crosses the wire is the adapters' state dict (named float32 tensors), encoded
with :mod:`ifedicl.federation_job.wire`; the server averages the flattened state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ifedicl.federation_job.client import CalibrationConfig, Client, local_epochs
from ifedicl.model_patches.inference import label_logits


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    lr: float = 5e-4
    init_seed: int = 0  # the server's initial A (B starts at zero, so the initial model is the base model)


def target_modules(model: nn.Module) -> list[str]:
    """Query/value projections: separate in Llama/Qwen/Mistral/Gemma, fused ``c_attn`` in GPT-2."""
    return ["c_attn"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj"]


def attach_lora(model: nn.Module, settings: LoraSettings):
    """Insert LoRA adapters into ``model`` in place; only they require grad. -> the peft wrapper."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.init_seed)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=target_modules(model),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, config)


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.from_numpy(np.asarray(state[name])))


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def flatten(state: dict[str, np.ndarray]) -> np.ndarray:
    """One float32 vector, tensors in name order (what the server's aggregators work on)."""
    return np.concatenate([np.asarray(state[n], np.float32).reshape(-1) for n in sorted(state)])


def unflatten(flat: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`, with ``like``'s names and shapes."""
    out, offset = {}, 0
    for name in sorted(like):
        size = like[name].size
        out[name] = np.asarray(flat[offset : offset + size], np.float32).reshape(like[name].shape)
        offset += size
    if offset != flat.size:
        raise ValueError(f"{flat.size} values for a state of {offset}")
    return out


@dataclass
class LoraResult:
    state: dict[str, np.ndarray]
    mean_loss: float
    steps: int


class LoraClient:
    """The FedAvg-LoRA client role on a :class:`~ifedicl.federation_job.client.Client`'s model, data and task."""

    def __init__(self, client: Client, settings: LoraSettings, model: nn.Module | None = None):
        self.client = client
        # client.ctx runs with the adapters from now on; ``model``: the adapters already attached (a host's
        # clients share one model, and each round loads the global adapters before training)
        self.model = attach_lora(client.ctx.model, settings) if model is None else model

    def batch_loss(self, rows: list[int], config: CalibrationConfig) -> torch.Tensor:
        c = self.client
        prompts = [c.task.prompt(c.data.texts[i]) for i in rows]
        logits, _ = label_logits(c.ctx, c.tokenizer, prompts, c.label_ids)
        classes = torch.as_tensor([c.data.labels[i] for i in rows])
        return c.label_loss(logits, classes, config.objective, config.prior_correction)

    def train(self, state: dict[str, np.ndarray], config: CalibrationConfig, seed: int) -> LoraResult:
        """Start from the global adapters, train them on the local shard, return the new ones."""
        load_trainable(self.model, state)
        torch.manual_seed(seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        try:
            losses = local_epochs(
                params, len(self.client.data), config, seed, lambda rows: self.batch_loss(rows, config)
            )
        finally:
            self.model.eval()
        return LoraResult(trainable_state(self.model), float(np.mean(losses)), len(losses))
