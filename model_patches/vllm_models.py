"""Injecting versions of vLLM's in-tree Llama, Qwen2 and Gemma 3 models.

Each decoder layer applies IFed-ICL's injection (:func:`ifedicl.model_patches.injection.inject`)
to the two block outputs that are added to the residual stream, per token, from
fixed per-layer tables. Llama/Qwen2: the attention output (before
``post_attention_layernorm``'s residual add) and the MLP output. Gemma 3 normalizes
each block's output before the residual add (``post_attention_layernorm``,
``post_feedforward_layernorm``), so it injects *after* those norms: on exactly
what is added to the residual, as the HF hooks do (:mod:`ifedicl.model_patches.hf`).
Tables:

    ifedicl_beta  [2, R]      block (attn, mlp) x table row
    ifedicl_shift [2, R, d]   λ·v per block and row

with R = max_slots + 2 task rows ("slots" = task rows): row 0 = no task (β = 1,
shift = 0), rows 1..max_slots hold (task, version) tables written by the server,
and the last row is the start-up probe (β = 0, shift = 0: it zeroes every block
output, so a request sent under it must score differently from the plain model if
the seam is live).

Which row a token uses comes from one shared ``token_task_row[max_tokens]`` buffer that
:mod:`ifedicl.model_patches.vllm_runner` fills before every forward from each scheduled
request's ``sampling_params.extra_args["task_row"]``. Everything the layer does is
tensor math on fixed buffers, so it runs unchanged under torch.compile.

Subclasses only add buffers and override ``forward``: parameter names stay the
same, so vLLM's weight loading is untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from ifedicl.model_patches.injection import ATTN, MLP, inject
from ifedicl.model_patches.vllm_plugin import DEFAULT_MAX_SLOTS, MAX_SLOTS_KEY
from ifedicl.model_patches.vllm_runner import install_runner_seam


class InjectionState:
    """Worker-side handle on one model's injection buffers (not an ``nn.Module``).

    ``token_task_row`` is shared by all layers; the runner seam writes it every step.
    """

    def __init__(self, layers: list[nn.Module], token_task_row: torch.Tensor, max_slots: int):
        self.layers = layers
        self.token_task_row = token_task_row  # [max_tokens] long
        self.max_slots = max_slots  # task rows 1..max_slots hold (task, version) tables
        self.probe_row = max_slots + 1
        self.steps_filled = 0  # forward steps whose token_task_row came from the seam
        self.tokens_injected = 0  # tokens that carried a non-zero row, over all steps
        self.invalid_task_rows = 0  # requests whose task_row was out of range (served plain)

    @property
    def num_rows(self) -> int:
        return self.max_slots + 2

    def write_rows(self, task_rows: list[int], beta: torch.Tensor, shift: torch.Tensor) -> None:
        """Copy tables in place: ``beta`` [L, 2, k], ``shift`` [L, 2, k, d] into ``task_rows`` (k of them)."""
        index = torch.as_tensor(task_rows, dtype=torch.long)  # [k]
        for layer, module in enumerate(self.layers):
            target_beta: torch.Tensor = module.ifedicl_beta  # [2, R]
            target_shift: torch.Tensor = module.ifedicl_shift  # [2, R, d]
            target_beta[:, index.to(target_beta.device)] = beta[layer].to(target_beta)
            target_shift[:, index.to(target_shift.device)] = shift[layer].to(target_shift)


class InjectingDecoderLayer(nn.Module):
    """Mixin for a decoder layer: per-layer injection tables and the one call into :func:`inject`.

    Subclasses write the forward of their family with :meth:`injected` wrapped
    around each of the two block outputs that are added to the residual stream.
    """

    ifedicl_beta: torch.Tensor  # [2, R]
    ifedicl_shift: torch.Tensor  # [2, R, d]
    ifedicl_token_task_row: torch.Tensor  # [max_tokens] long, shared by every layer

    def init_injection(self, token_task_row: torch.Tensor, num_rows: int, dtype: torch.dtype) -> None:
        device = token_task_row.device
        beta = torch.ones(2, num_rows, dtype=dtype, device=device)
        beta[:, num_rows - 1] = 0.0  # probe row: zero every block output
        self.register_buffer("ifedicl_beta", beta, persistent=False)
        self.register_buffer(
            "ifedicl_shift", torch.zeros(2, num_rows, self.hidden_size, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer("ifedicl_token_task_row", token_task_row, persistent=False)

    def injected(self, block: int, out: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d]
        task_row = self.ifedicl_token_task_row[: out.shape[0]]  # [n]
        return inject(out, task_row, self.ifedicl_beta[block], self.ifedicl_shift[block])


class LlamaLayoutInjection(InjectingDecoderLayer):
    """Llama-layout forward (Llama and Qwen2 share it) with the two injections.

    The block outputs are injected where the HF hooks inject them: before each
    is added to the residual stream (inside the fused add-norm that follows).
    """

    def forward(
        self,
        positions: torch.Tensor,  # [n]
        hidden_states: torch.Tensor,  # [n, d]
        residual: torch.Tensor | None,  # [n, d]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)  # [n, d]
        hidden_states = self.injected(ATTN, hidden_states)

        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)  # [n, d]
        hidden_states = self.injected(MLP, hidden_states)
        return hidden_states, residual


class IfediclGemma3DecoderLayer(InjectingDecoderLayer, Gemma3DecoderLayer):
    """Gemma 3 decoder layer: inject after the post-attention and post-feed-forward norms."""

    def forward(
        self,
        positions: torch.Tensor,  # [n]
        hidden_states: torch.Tensor,  # [n, d]
        residual: torch.Tensor | None,  # [n, d]
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states, **kwargs)  # [n, d]
        hidden_states = self.injected(ATTN, self.post_attention_layernorm(hidden_states))

        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)  # [n, d]
        hidden_states = self.injected(MLP, self.post_feedforward_layernorm(hidden_states))
        return hidden_states, residual


class IfediclLlamaDecoderLayer(LlamaLayoutInjection, LlamaDecoderLayer):
    """Llama (and Mistral-layout) decoder layer with per-token injection."""


class IfediclQwen2DecoderLayer(LlamaLayoutInjection, Qwen2DecoderLayer):
    """Qwen2 decoder layer with per-token injection."""


def _attach_injection(model: nn.Module, vllm_config: VllmConfig, layer_cls: type[InjectingDecoderLayer]) -> None:
    """Give every local decoder layer its tables, share one token_task_row buffer, install the seam.

    Layers are converted in place (``__class__`` swap to the injecting subclass):
    Qwen2ForCausalLM and Gemma3ForCausalLM build their layers without a layer-type
    argument, and the swap adds no parameters, so checkpoint names are unchanged.
    """
    config = vllm_config.model_config.hf_config.get_text_config()
    max_slots = int(getattr(config, MAX_SLOTS_KEY, DEFAULT_MAX_SLOTS))
    dtype = vllm_config.model_config.dtype
    device = next(model.parameters()).device
    # Sized for the largest step the runner can schedule (padded batches included).
    scheduler = vllm_config.scheduler_config
    max_tokens = 2 * max(scheduler.max_num_batched_tokens, scheduler.max_num_seqs) + 1024
    token_task_row = torch.zeros(max_tokens, dtype=torch.long, device=device)  # [max_tokens]
    layers = []
    for layer in model.model.layers:
        if isinstance(layer, PPMissingLayer):
            continue
        if not isinstance(layer, layer_cls):
            layer.__class__ = layer_cls
        layer.init_injection(token_task_row, max_slots + 2, dtype)
        layers.append(layer)
    model.ifedicl = InjectionState(layers, token_task_row, max_slots)
    install_runner_seam()


class IfediclLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with IFed-ICL injection; select with ``hf_overrides`` architectures."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=IfediclLlamaDecoderLayer)
        _attach_injection(self, vllm_config, IfediclLlamaDecoderLayer)


class IfediclQwen2ForCausalLM(Qwen2ForCausalLM):
    """vLLM's Qwen2 with IFed-ICL injection; select with ``hf_overrides`` architectures."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _attach_injection(self, vllm_config, IfediclQwen2DecoderLayer)


class IfediclGemma3ForCausalLM(Gemma3ForCausalLM):
    """vLLM's Gemma 3 (text) with IFed-ICL injection; select with ``hf_overrides`` architectures."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _attach_injection(self, vllm_config, IfediclGemma3DecoderLayer)
