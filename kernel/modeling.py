"""Loading the frozen LLM, fingerprinting it, and sharing its weights between actors.

Simulated clients on one node must not each hold a copy of the weights (10 copies
of a 0.5B float32 model is 20 GB). :func:`export_weights` turns a loaded model into
flat numpy buffers that Ray stores once per node in its shared-memory object
store; :func:`model_from_weights` builds a model whose parameters *are* those
buffers (zero-copy, read-only), so each client actor runs its own forward passes
on its own data without a private copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.model_fingerprint import ModelFingerprint  # defined torch-free; re-exported here
from ifedicl.kernel.model_source import model_identity, recorded_identity, resolve_model

# Keys that change with how a config was saved or loaded, not with the model itself.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(IfediclError):
    """The model or tokenizer could not be loaded."""


def config_hash(config) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model_id: str, config) -> ModelFingerprint:
    """What a run records of its model and a server checks: a local directory by its content, not its path
    (:func:`~ifedicl.kernel.model_source.recorded_identity`), with the config's shape and hash."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return ModelFingerprint(recorded_identity(str(model_id)), int(layers), int(hidden), config_hash(config))


def load_config(model_id: str):
    from transformers import AutoConfig

    path = resolve_model(model_id)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(f"cannot load model config {model_id!r}: {err}") from None


def load_tokenizer(model_id: str):
    """The model's tokenizer with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(f"cannot load tokenizer of {model_id!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(model_id: str, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """A frozen causal LM in eval mode: no parameter requires grad."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as err:
        raise ModelLoadError(f"cannot load model {model_id!r}: {err}") from None
    return freeze(model.to(device))


def slow_dtype_reason(dtype: str, device: str = "cpu") -> str | None:
    """Why ``dtype`` computes far slower than float32 on this machine, or None.

    PyTorch's CPU matmuls in bfloat16 are fast only where oneDNN has bfloat16 kernels (AVX512-BF16 or
    AMX); elsewhere (AVX2-only CPUs) they fall back to scalar code, measured ~100x slower than float32
    here, which turns a report of hours into weeks. Results are the same, so this is a warning, not an error.
    """
    if device != "cpu" or dtype != "bfloat16" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"this CPU ({capability}) has no bfloat16 matmul kernels: a bfloat16 model computes roughly 100x slower "
        "than float32 here (--dtype float32 is the fast choice on this machine; its cells are not the bfloat16 ones)"
    )


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@dataclass
class SharedWeights:
    """A model's tensors as flat byte buffers plus what is needed to rebuild it.

    ``buffers`` holds one entry per distinct storage (tied weights are stored once);
    ``names`` maps every parameter/buffer name to its buffer key.
    """

    config: dict
    buffers: dict[str, np.ndarray]  # key -> uint8 [nbytes]
    meta: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype name, shape)
    names: dict[str, str]  # tensor name -> key


def export_weights(model: nn.Module) -> SharedWeights:
    buffers: dict[str, np.ndarray] = {}
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    names: dict[str, str] = {}
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident not in by_storage:
            key = str(len(buffers))
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            buffers[key] = flat.view(torch.uint8).numpy()
            meta[key] = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            by_storage[ident] = key
        names[name] = by_storage[ident]
    return SharedWeights(model.config.to_dict(), buffers, meta, names)


def load_shared_weights(model_id: str, dtype: str = "float32") -> SharedWeights:
    """Load a model and export it for the object store (the driver puts it there: ``ray_pool.put_shared_weights``)."""
    return export_weights(load_model(model_id, dtype))


def model_from_weights(shared: SharedWeights) -> nn.Module:
    """Build a frozen model whose tensors alias ``shared``'s buffers (no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(shared.config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # object-store arrays are read-only; the model never writes them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, array in shared.buffers.items():
            dtype_name, shape = shared.meta[key]
            tensors[key] = torch.from_numpy(array).view(getattr(torch, dtype_name)).view(shape)
    params: dict[str, nn.Parameter] = {}
    for name, key in shared.names.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            params.setdefault(key, nn.Parameter(tensors[key], requires_grad=False))
            module._parameters[attr] = params[key]
        else:
            module._buffers[attr] = tensors[key]
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelLoadError(f"shared weights did not cover {leftover[:5]}")
    return freeze(model)


def canonical_model_id(model_id: str) -> str:
    """The id a run loads its model by: a GGUF's content id, an absolute local path (./m and /abs/m match), a hub
    id at a commit, or a hub id. What it records and compares is :func:`fingerprint`'s (a directory's content)."""
    return model_identity(model_id)
