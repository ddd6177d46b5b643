"""Hugging Face adapter: capture block outputs and inject context vectors.

Works by forward hooks on each decoder layer's attention and MLP modules, so the
model's parameter names (and therefore checkpoint loading) are untouched. The math
itself lives in :func:`ifedicl.model_patches.injection.inject`; this module only finds the
modules and routes tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ifedicl.model_patches.injection import InjectionTables, inject


class UnsupportedArchitectureError(ValueError):
    """The model's module layout is not one we know how to hook."""


@dataclass(frozen=True)
class BlockLayout:
    """Where a model family keeps its decoder layers and their two blocks."""

    family: str
    layers_path: str  # dotted path from the top model to the layer ModuleList
    attn_name: str  # the module whose output is the attention block's residual update
    mlp_name: str  # the module whose output is the MLP block's residual update
    # I2CL's training-only noise on the block outputs while Λ is calibrated (``inject``'s ``noise_scale``).
    # 1e-3 is I2CL's (docs/method.md). Gemma 3's normalized residual updates do not tolerate it: with 1e-3 its Λ
    # never trains and centralized I2CL lands below zero-shot; 1e-4 trains as well as none (docs/ablation-gemma
    # has the numbers). SmolLM2's training loss barely moves between 1e-3 and none, so it keeps I2CL's.
    training_noise: float = 1e-3


# Families by module layout (not by class name): Llama/Mistral/Qwen2 share one. Gemma 3
# normalizes each block's output before the residual add, so its residual updates are
# the outputs of the post-attention and post-feed-forward norms; it is tried first
# because its layers also have ``self_attn`` and ``mlp``.
LAYOUTS = (
    BlockLayout("gemma3", "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", 1e-4),
    BlockLayout("llama", "model.layers", "self_attn", "mlp"),
    BlockLayout("gpt2", "transformer.h", "attn", "mlp"),
)


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module) -> tuple[BlockLayout, list[tuple[nn.Module, nn.Module]]]:
    """Return the layout and ``[(attn_module, mlp_module)] * L`` of ``model``."""
    for layout in LAYOUTS:
        layers = _get_path(model, layout.layers_path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            first = layers[0]
            if hasattr(first, layout.attn_name) and hasattr(first, layout.mlp_name):
                blocks = [(getattr(layer, layout.attn_name), getattr(layer, layout.mlp_name)) for layer in layers]
                return layout, blocks
    arch = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {arch[0]}: expected decoder layers at "
        + " or ".join(f"'{lo.layers_path}[i].{lo.attn_name}/.{lo.mlp_name}'" for lo in LAYOUTS)
        + " (Gemma 3, Llama, Mistral, Qwen2, GPT-2 families)"
    )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding. [B, S] -> [B]."""
    seq_len = attention_mask.shape[1]
    flipped_first_real = attention_mask.flip(dims=[1]).long().argmax(dim=1)  # [B]
    return seq_len - 1 - flipped_first_real


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so padding side never shifts them. [B, S]."""
    positions = attention_mask.long().cumsum(dim=1) - 1
    return positions.clamp(min=0)


def _block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_block_output(output: torch.Tensor | tuple, new: torch.Tensor) -> torch.Tensor | tuple:
    return (new, *output[1:]) if isinstance(output, tuple) else new


class HFContextModel:
    """A frozen HF causal LM with capture and injection hooks.

    Use :meth:`capturing` to read every block output at the last real token, and
    :meth:`injecting` to apply a set of tasks' tables during forward passes.
    Hooks are installed once and are inert outside those contexts.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layout, self.blocks = find_blocks(model)
        self.num_layers = len(self.blocks)
        self._capture: list[list[torch.Tensor | None]] | None = None
        self._capture_index: torch.Tensor | None = None  # [B]
        self._tables: InjectionTables | None = None
        self._task_row: torch.Tensor | None = None  # [B, S]
        self._noise_scale = 0.0
        self._handles = [
            module.register_forward_hook(self._make_hook(layer, block))
            for layer, pair in enumerate(self.blocks)
            for block, module in enumerate(pair)
        ]

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer: int, block: int):
        def hook(_module: nn.Module, _inputs: tuple, output):
            hidden = _block_output(output)  # [B, S, d]
            if self._tables is not None:
                hidden = inject(
                    hidden,
                    self._task_row,
                    self._tables.beta[layer, block],
                    self._tables.shift[layer, block],
                    self._noise_scale,
                )
                output = _replace_block_output(output, hidden)
            if self._capture is not None:
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                self._capture[layer][block] = hidden[rows, self._capture_index].detach()  # [B, d]
            return output

        return hook

    @contextmanager
    def capturing(self, attention_mask: torch.Tensor) -> Iterator[list[list[torch.Tensor | None]]]:
        """Collect ``[L][2] -> [B, d]`` block outputs at each row's last real token."""
        self._capture = [[None, None] for _ in range(self.num_layers)]
        self._capture_index = last_token_index(attention_mask)
        try:
            yield self._capture
        finally:
            self._capture = None
            self._capture_index = None

    @contextmanager
    def injecting(
        self,
        tables: InjectionTables,
        task_row: torch.Tensor,  # [B] per example: its row in ``tables`` (0 = none)
        seq_len: int,
        noise_scale: float = 0.0,
    ) -> Iterator[None]:
        """Inject ``tables`` at every position, every layer, both blocks (a row outside them: plain)."""
        if tables.num_layers != self.num_layers or tables.hidden_size != self.hidden_size:
            raise ValueError(
                f"tables are for L={tables.num_layers}, d={tables.hidden_size}; "
                f"model has L={self.num_layers}, d={self.hidden_size}"
            )
        self._tables = tables
        self._task_row = task_row.view(-1, 1).expand(-1, seq_len)  # [B, S]
        self._noise_scale = noise_scale
        try:
            yield
        finally:
            self._tables = None
            self._task_row = None
            self._noise_scale = 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits at each row's last real token: [B, vocab].

        Only the sequence positions that are some row's last token go through the LM
        head (``logits_to_keep``): the head is a d x vocab matmul per position, as
        costly as the whole body for a large vocabulary (Gemma 3: 262k), and every
        caller needs one position per row.
        """
        last = last_token_index(attention_mask)  # [B]
        keep = torch.unique(last)  # [k] sorted, k <= B
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=keep,
        )
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return out.logits[rows, torch.searchsorted(keep, last)]  # [B, V]
