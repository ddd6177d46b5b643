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
    "IfediclLlamaForCausalLM": "model_patches.vllm_models:IfediclLlamaForCausalLM",
    "IfediclQwen2ForCausalLM": "model_patches.vllm_models:IfediclQwen2ForCausalLM",
    "IfediclGemma3ForCausalLM": "model_patches.vllm_models:IfediclGemma3ForCausalLM",
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
WORKER_EXTENSION = "model_patches.vllm_worker.IfediclWorkerExtension"

# hf_config attribute that sizes the per-layer tables (task/version slots).
MAX_SLOTS_KEY = "ifedicl_max_slots"
DEFAULT_MAX_SLOTS = 32

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
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    return {
        "hf_overrides": {"architectures": [injecting_architecture(hf_architectures)], MAX_SLOTS_KEY: int(max_slots)},
        "worker_extension_cls": WORKER_EXTENSION,
    }
