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
    """Install the pinned packages (only if missing) and convert the model once."""
    import shutil

    from ifedicl.kernel.gguf_cache import conversion_dir, converted_dir, file_sha256
    from ifedicl.kernel.model_catalog import named_model, pull

    for name in names:
        named_model(name)  # an unknown name fails before anything is installed
    for name in names:
        started = time.monotonic()
        gguf = pull(name, force=force)
        if force:
            shutil.rmtree(conversion_dir(file_sha256(gguf)), ignore_errors=True)
        directory = converted_dir(gguf)
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
