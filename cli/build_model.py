"""``ifedicl build-model``: a small random model, built offline, for trying the pipeline without a hub."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from ifedicl.kernel.errors import IfediclError

# devkit.tiny_model.FAMILIES, spelled here so that --help lists them without importing torch
Family = Literal["llama", "qwen2", "gemma3", "gpt2"]


def build_model_command(
    out: Path = typer.Option(..., help="directory to write the model and tokenizer to"),
    task_dir: list[Path] = typer.Option(..., help="task dirs whose texts train the tokenizer (repeatable)"),
    family: Family = typer.Option("llama", help="model family (architecture)"),
    layers: int = 2,
    hidden_size: int = 128,
    vocab_size: int = 2048,
    seed: int = 0,
) -> None:
    """Build a small random model offline (for trying the pipeline without a hub)."""
    from ifedicl.devkit.demo_data import corpus
    from ifedicl.devkit.tiny_model import build_tiny_model
    from ifedicl.kernel.data import load_task_dir

    texts: list[str] = []
    for directory in task_dir:
        data = load_task_dir(directory)
        texts += corpus(data.task, data.train.texts)
    try:
        build_tiny_model(out, texts, family, layers, hidden_size, vocab_size, seed)
    except ValueError as err:
        raise IfediclError(str(err)) from None
    typer.echo(f"wrote a random {family} (L={layers}, d={hidden_size}) to {out}")
