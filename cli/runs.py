"""``ifedicl runs``, ``publish`` and ``rollback``: what is in the store, and which run each task serves."""

from __future__ import annotations

import json

import typer


def runs_command(
    store: str = typer.Option(..., envvar="IFEDICL_STORE", help="LanceDB URI or local directory"),
    task: str | None = None,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List runs with their status, and which one is published per task."""
    from ifedicl.storage.store import Store

    stored = Store(store)
    published = stored.published()
    rows = stored.runs(task)
    if as_json:
        for row in rows:
            row = {k: (str(v) if k.endswith("_at") else v) for k, v in row.items()}
            typer.echo(json.dumps({**row, "published": published.get(row["task"]) == row["run_id"]}))
        return
    if not rows:
        typer.echo("no runs")
    for row in rows:
        mark = "*" if published.get(row["task"]) == row["run_id"] else " "
        summary = json.loads(row["summary"] or "{}")
        acc = f" acc={summary['accuracy']:.3f}" if "accuracy" in summary else ""
        typer.echo(f"{mark} {row['run_id']}  {row['status']:<8} {row['created_at']:%Y-%m-%d %H:%M:%S}{acc}")


def publish_command(run_id: str, store: str = typer.Option(..., envvar="IFEDICL_STORE")) -> None:
    """Make a complete run the live one for its task."""
    from ifedicl.storage.store import Store

    task = Store(store).publish(run_id)
    typer.echo(f"published {run_id} for task {task}")


def rollback_command(task: str, store: str = typer.Option(..., envvar="IFEDICL_STORE")) -> None:
    """Move the task's tag back to the run published before the current one."""
    from ifedicl.storage.store import Store

    run_id = Store(store).rollback(task)
    typer.echo(f"task {task} rolled back to {run_id}")
