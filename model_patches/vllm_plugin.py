"""vLLM general plugin: makes IFed-ICL's injecting model classes known to vLLM.

vLLM calls :func:`register` in *every* process it starts (API server, engine core,
workers), possibly more than once, so it only records class paths: the model
modules (which import torch and vLLM's model code) are imported lazily by vLLM's
registry, in the worker that builds the model.

A checkpoint is served with injection without editing it: the engine is started
with ``hf_overrides={"architectures": [<injecting class>], ...}`` and the worker
extension below, which :func:`engine_overrides` assembles.
"""

from __future__ import annotations

# Injecting architecture -> "module:Class", imported lazily by vLLM's ModelRegistry.
ARCHITECTURES: dict[str, str] = {
    "IfediclLlamaForCausalLM": "ifedicl.model_patches.vllm_models:IfediclLlamaForCausalLM",
    "IfediclQwen2ForCausalLM": "ifedicl.model_patches.vllm_models:IfediclQwen2ForCausalLM",
    "IfediclGemma3ForCausalLM": "ifedicl.model_patches.vllm_models:IfediclGemma3ForCausalLM",
}

# HF architecture of the checkpoint -> the injecting class that serves it.
# Mistral's HF checkpoints share Llama's layout, so they ride on the Llama class.
INJECTING_ARCHITECTURE: dict[str, str] = {
    "LlamaForCausalLM": "IfediclLlamaForCausalLM",
    "MistralForCausalLM": "IfediclLlamaForCausalLM",
    "Qwen2ForCausalLM": "IfediclQwen2ForCausalLM",
    "Gemma3ForCausalLM": "IfediclGemma3ForCausalLM",
}

# vLLM resolves this qualified name in each worker and mixes it into the worker
# class, which exposes the buffer-management RPCs to ``collective_rpc``.
WORKER_EXTENSION = "ifedicl.model_patches.vllm_worker.IfediclWorkerExtension"

# hf_config attribute that sizes the per-layer tables (task/version slots).
MAX_SLOTS_KEY = "ifedicl_max_slots"
DEFAULT_MAX_SLOTS = 32
# What a server gives its task tables when --max-slots is not set: 256 MiB holds
# 1,938 SmolLM2-135M tasks in float32 (138,480 B each), 256 of a 7B Llama's.
DEFAULT_TABLE_MEMORY = 256 * 2**20
MAX_SLOTS_LIMIT = 65_536

_registered = False


def register() -> None:
    """Entry point of ``vllm.general_plugins``: cheap and idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, path in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)
    _registered = True


def table_bytes_per_slot(num_layers: int, hidden_size: int, itemsize: int) -> int:
    """Engine memory one (task, version) row takes: β [L, 2] and λ·v [L, 2, d] in the model's dtype."""
    return num_layers * 2 * (hidden_size + 1) * itemsize


def slots_for_memory(budget_bytes: int, num_layers: int, hidden_size: int, itemsize: int) -> int:
    """How many task rows fit in ``budget_bytes`` (at least 1, at most ``MAX_SLOTS_LIMIT``)."""
    per_slot = table_bytes_per_slot(num_layers, hidden_size, itemsize)
    if budget_bytes < per_slot:
        raise ValueError(f"a table memory of {budget_bytes} B holds no task: one takes {per_slot} B on this model")
    return min(MAX_SLOTS_LIMIT, budget_bytes // per_slot)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no injecting vLLM class."""


def injecting_architecture(hf_architectures: list[str] | None) -> str:
    """The injecting class name for a checkpoint's ``config.architectures``."""
    for arch in hf_architectures or []:
        if arch in INJECTING_ARCHITECTURE:
            return INJECTING_ARCHITECTURE[arch]
        if arch in ARCHITECTURES:  # already overridden
            return arch
    raise UnsupportedModelError(
        f"no injecting vLLM model for architectures {hf_architectures}; "
        f"supported: {sorted(INJECTING_ARCHITECTURE)}"
    )


def engine_overrides(hf_architectures: list[str] | None, max_slots: int = DEFAULT_MAX_SLOTS) -> dict:
    """Engine arguments that turn injection on for a checkpoint (``LLM(**...)``, ``AsyncEngineArgs``).

    ``max_slots`` is how many (task, version) tables the engine holds at once,
    besides row 0 (no task) and the start-up probe row.
    """
    if not 1 <= max_slots <= MAX_SLOTS_LIMIT:
        raise ValueError(f"max_slots must be in 1..{MAX_SLOTS_LIMIT}, got {max_slots}")
    return {
        "hf_overrides": {"architectures": [injecting_architecture(hf_architectures)], MAX_SLOTS_KEY: int(max_slots)},
        "worker_extension_cls": WORKER_EXTENSION,
    }
