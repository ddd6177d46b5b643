"""Small random models built on the spot, for the demo, tests and benchmarks.

No hub is reachable in CI, so every model a test or the demo uses is created here:
a byte-level BPE tokenizer trained on the given texts (so label words become
single tokens) and a randomly initialised Llama, Qwen2, Gemma 3 or GPT-2 with head_dim 64
(the CPU vLLM attention kernels need it). Speed does not depend on weight values,
so ``hidden_size``/``num_layers`` can be raised to realistic shapes for benches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")
HEAD_DIM = 64
# Gemma 3 alternates sliding-window and full attention; a short window makes tests cross it.
GEMMA3_SLIDING_WINDOW = 32


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    family: str = "llama",
    num_layers: int = 2,
    hidden_size: int = 128,
    vocab_size: int = 1024,
    seed: int = 0,
    max_positions: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random ``family`` model and its tokenizer to ``out_dir``; return the path."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if hidden_size % HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {HEAD_DIM}, got {hidden_size}")
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    heads = hidden_size // HEAD_DIM
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # What every decoder-only family but GPT-2 names the same way.
    decoder = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        **common,
    )
    if family == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=heads, n_positions=max_positions, **common)
    elif family == "gemma3":
        config = Gemma3TextConfig(
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)],
            architectures=["Gemma3ForCausalLM"],
            **decoder,
        )
    else:
        config_cls = LlamaConfig if family == "llama" else Qwen2Config
        config = config_cls(tie_word_embeddings=False, **decoder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
