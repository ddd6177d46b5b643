"""``ifedicl models``: install the named real models and show what is installed."""

from __future__ import annotations

import time
from pathlib import Path

import typer

models_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Named real models (offline packages).")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


@models_app.command("pull")
def pull_command(
    names: list[str] = typer.Argument(..., help="model names (see `ifedicl models list`)"),
    force: bool = typer.Option(False, help="reinstall the packages and redo the conversion"),
) -> None:
    """Install the pinned packages (only if missing) and convert each model once, side by side."""
    import os
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from ifedicl.kernel.gguf_cache import conversion_dir, converted_dir, file_sha256
    from ifedicl.kernel.model_catalog import named_model, pull

    for name in names:
        named_model(name)  # an unknown name fails before anything is installed
    started = time.monotonic()
    ggufs = {name: pull(name, force=force) for name in names}  # pip: one at a time
    if force:
        for gguf in ggufs.values():
            shutil.rmtree(conversion_dir(file_sha256(gguf)), ignore_errors=True)
    # A conversion is one core's work for a minute or two; one process per model uses the others.
    with ProcessPoolExecutor(max_workers=max(1, min(len(ggufs), os.cpu_count() or 1))) as pool:
        conversions = {name: pool.submit(converted_dir, gguf) for name, gguf in ggufs.items()}
        for name, gguf in ggufs.items():
            directory = conversions[name].result()
            typer.echo(
                f"{name}: {gguf} ({_mb(_size(gguf))}) -> {directory} ({_mb(_size(directory))}), "
                f"{time.monotonic() - started:.0f} s"
            )


@models_app.command("list")
def list_command() -> None:
    """Named models: installed or not, where, and their size on disk."""
    from ifedicl.kernel.gguf_cache import conversion_dir, file_sha256
    from ifedicl.kernel.model_catalog import MODELS

    for model in MODELS.values():
        path = model.locate()
        if not model.installed_packages() or path is None or not path.is_file():
            typer.echo(f"{model.name:14} not installed   {model.description}  (ifedicl models pull {model.name})")
            continue
        converted = conversion_dir(file_sha256(path))
        state = f"converted {converted} ({_mb(_size(converted))})" if converted.is_dir() else "not converted yet"
        typer.echo(f"{model.name:14} installed       {model.description}")
        typer.echo(f"{'':16}gguf {path} ({_mb(_size(path))}); {state}")
