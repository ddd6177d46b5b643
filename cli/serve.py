"""``ifedicl serve``: the patched vLLM engine behind an OpenAI-compatible API.

Importing this module must stay cheap: vLLM and torch load only when the
command runs. Unknown options are vLLM engine/server arguments and pass
through untouched (``ifedicl serve --store s --model m --enforce-eager --max-model-len 2048``).
"""

from __future__ import annotations

import typer

from ifedicl.cli.option_sets import model_for_store, revision_option


def serve_command(
    ctx: typer.Context,
    store: str = typer.Option(
        ..., "--store", envvar="IFEDICL_STORE", help="LanceDB URI or local directory with published runs"
    ),
    model: str = typer.Option(
        ..., "--model", envvar="IFEDICL_MODEL", help="HF model id or local path (the one the runs were made with)"
    ),
    revision: str | None = revision_option(),
    host: str = typer.Option("0.0.0.0", "--host", help="address to bind"),
    port: int = typer.Option(8000, "--port", help="port to bind"),
    poll_interval: float = typer.Option(
        30.0, "--poll-interval", help="seconds between store checks for newly published runs (0 = only /admin/reload)"
    ),
    max_slots: int = typer.Option(
        None,
        "--max-slots",
        help="task versions whose tables the engine holds at once (default: what --table-memory-mb holds); "
        "more published tasks load on first use, evicting the least recently used",
    ),
    table_memory_mb: float = typer.Option(
        256.0, "--table-memory-mb", help="engine memory for task tables when --max-slots is not given"
    ),
    max_inputs: int = typer.Option(
        256, "--max-inputs-per-request", help="texts one request may carry (more: 400, the limit in the message)"
    ),
    max_body_bytes: int = typer.Option(
        4 * 1024 * 1024, "--max-body-bytes", help="largest request body accepted (more: 413 before parsing)"
    ),
    slot_wait_seconds: float = typer.Option(
        60.0,
        "--slot-wait-seconds",
        help="how long a request for a non-resident task waits while every slot is in use (then 503)",
    ),
    auto_route: bool = typer.Option(
        False, "--auto-route", help='serve model="auto": each text goes to its nearest task (one more weight copy)'
    ),
    routing_index: str = typer.Option(
        None, "--routing-index", help="directory of the LanceDB routing index (default: a temporary one)"
    ),
) -> None:
    """Serve published tasks over an OpenAI-compatible API (extra options go to vLLM).

    Options not listed below are vLLM's engine and server options and pass through unchanged
    (vllm serve --help lists them), e.g. --dtype float32 --max-model-len 2048 --enforce-eager.

    Without --dtype the engine computes in the dtype the published runs were made in
    (so served answers are the evaluated ones); with another, each run is re-scored on
    its held-out split at load and both accuracies are reported.
    """
    model = model_for_store(model, revision, store)  # before vLLM loads: a bad --revision fails at once
    from ifedicl.serving.launch import ServingLimits, run_server

    run_server(
        store=store,
        model=model,
        host=host,
        port=port,
        poll_interval=poll_interval,
        max_slots=max_slots,
        table_memory=int(table_memory_mb * 2**20),
        limits=ServingLimits(
            max_inputs=max_inputs, max_body_bytes=max_body_bytes, slot_wait_seconds=slot_wait_seconds
        ),
        auto_route=auto_route,
        routing_index=routing_index,
        engine_args=list(ctx.args),
    )

