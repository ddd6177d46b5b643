"""``ifedicl predict``: classify texts on the HF reference path with a stored run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ifedicl.cli.option_sets import model_for_store, revision_option
from ifedicl.kernel.errors import IfediclError


def predict_command(
    texts: list[str] = typer.Argument(None, help="texts to classify"),
    store: str = typer.Option(..., envvar="IFEDICL_STORE", help="LanceDB URI or local directory"),
    model: str = typer.Option(..., envvar="IFEDICL_MODEL", help="HF model id or local path (the run's)"),
    revision: str | None = revision_option(),
    task: str = typer.Option(...),
    run: str | None = typer.Option(None, help="a run id instead of the published one"),
    file: Path | None = typer.Option(None, help="one text per line"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per text"),
) -> None:
    """Classify texts on the HF reference path with a stored run."""
    from ifedicl.serving.reference import ReferenceClassifier
    from ifedicl.storage.store import Store

    items = list(texts or [])
    if file is not None:
        if not file.exists():
            raise IfediclError(f"file {file} does not exist")
        items += [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise IfediclError("no text to classify: pass TEXT arguments or --file")
    stored = Store(store)
    classifier = ReferenceClassifier(model_for_store(model, revision, store))
    stored_run = classifier.load(stored, task, run)
    for p in classifier.classify(stored_run.task, items, stored_run):
        if as_json:
            typer.echo(json.dumps({"text": p.text, "label": p.label, "probabilities": p.probabilities}))
        else:
            probs = ", ".join(f"{w}={v:.3f}" for w, v in p.probabilities.items())
            typer.echo(f"{p.label}\t[{probs}]\t{p.text}")
