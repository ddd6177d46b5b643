"""What each trust option costs: bytes per client (measured on the wire) and accuracy.

Prints figures, asserts nothing. Runs the same small federation once per option and
reads the run's own summary: the bytes are the exact payload lengths that crossed the
Ray boundary; ε comes from the run's privacy record. By default a random Llama on the
synthetic sentiment task (fast; its accuracy only shows the pipeline runs); with
``--model`` (a named model, a .gguf file or an HF directory) and ``--task-dir`` the
accuracies are a real model's.

    python bench/trust.py --clients 4 --rounds 2
    python bench/trust.py --model smollm2-135m --task-dir devkit/demo_tasks/subj
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ifedicl.devkit.demo_data import corpus, make_sentiment_dir
from ifedicl.devkit.tiny_model import build_tiny_model
from ifedicl.federation_job.driver import Federation, FederationSettings, ensure_ray
from ifedicl.federation_job.privacy import PrivacySettings
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.sources import DataSource

VARIANTS = {
    "plain mean": {},
    "median": {"aggregator": "median"},
    "trimmed mean 0.25": {"aggregator": "trimmed-mean", "trim_fraction": 0.25},
    "secagg": {"secagg": True},
    "DP ε=8 (vectors) + ε=8 (Λ)": {"privacy": PrivacySettings(8.0, 1.0, 8.0, 0.1)},
    "DP + secagg": {"privacy": PrivacySettings(8.0, 1.0, 8.0, 0.1), "secagg": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--model", help="a named model, .gguf file or HF directory (default: a random Llama)")
    parser.add_argument("--task-dir", type=Path, help="task directory (default: the synthetic sentiment task)")
    args = parser.parse_args()
    ensure_ray()  # one local Ray for every variant
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = args.task_dir or make_sentiment_dir(root / "data")
        data = load_task_dir(data_dir)
        if args.model:
            model = args.model
            print(f"model: {model}; task {data.task.name}; {args.clients} clients, {args.rounds} rounds")
        else:
            texts = corpus(data.task, data.train.texts)
            model = build_tiny_model(root / "model", texts, "llama", args.layers, args.hidden)
            print(f"model: random Llama L={args.layers} d={args.hidden}; {args.clients} clients, {args.rounds} rounds")
        print(
            "| option | stage-1 up/client (B) | round up/client (B) | round down/client (B) | acc (0-shot -> run) | ε |"
        )
        print("|---|---|---|---|---|---|")
        for name, extra in VARIANTS.items():
            settings = FederationSettings(
                clients=args.clients, alpha=1.0, rounds=args.rounds, min_clients=2, round_timeout_s=600, **extra
            )
            result = Federation(str(model), DataSource(str(data_dir)), str(root / "store"), settings).run()
            s = result.summary
            eps = s["privacy"]["total_epsilon"]
            print(
                f"| {name} | {s['stage1_bytes_up_per_client']} | {s['round_bytes_up_per_client']} | "
                f"{s['round_bytes_down_per_client']} | {s['zero_shot_accuracy']:.3f} -> {s['accuracy']:.3f} | "
                f"{'-' if eps is None else f'{eps:.2f}'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
