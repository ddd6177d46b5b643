"""Federation cost on one node: wall time and peak memory, shared vs per-actor weights.

Prints figures, asserts nothing. Memory is the peak over the run of the summed PSS
(proportional set size) of the driver and every process under it (raylet, workers,
the object store's shared memory counted once across its mappers), sampled every
0.2 s ("peak": it includes the one-off load, where the loader briefly holds its private
copy and the object-store copy at once). "working" is one snapshot of the same sum
taken while every client is calibrating (right after round 1 is dispatched), so it is
comparable between runs. "weight copies" = (working PSS with the bench model - working
PSS with a tiny model, same clients) / bytes of one float32 copy of the bench model's
weights: how many copies of the weights the node really holds while it federates.

The bench checkpoint is saved in bfloat16 and loaded in float32 (the calibration
dtype), so a per-actor load materialises a private copy. (A float32 safetensors file
loaded on CPU is memory-mapped by transformers, so per-actor loads then share the
page cache too; the object store shares in every case: any format, dtype cast or
device.)

    python bench/federation.py --clients 1 2 5 10 --layers 12 --hidden 768

Virtual clients (``--virtual``): N clients hosted on ``--actors`` processes, each round sampling
the same number of examples (a fraction of the clients), against 10 clients on their own hosts:
peak and working PSS of the whole job, weight copies, and seconds per round per sampled example
as a ratio to the 10-client run (the cost of hosting many clients, not of computing more).

    python bench/federation.py --virtual 10 1000 --actors 2 --model smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from ifedicl.devkit.demo_data import corpus, make_sentiment_dir
from ifedicl.devkit.tiny_model import build_tiny_model
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.model_source import resolve_model
from ifedicl.kernel.sources import DataSource


class PeakPSS:
    """Samples the summed PSS of this process tree in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.working = 0  # snapshot while the clients calibrate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        root = psutil.Process()
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakPSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_once(
    model: Path, data: Path, store: Path, clients: int, weights: str, per_client: int, **settings_fields
) -> dict:
    fields = dict(clients=clients, alpha=100.0, rounds=1, min_shard=1, weights=weights) | settings_fields
    settings = FederationSettings(**fields)
    source = DataSource(str(data), max_train=per_client * clients, max_test=0)
    start = time.perf_counter()
    with PeakPSS() as mem:

        def snapshot_while_calibrating(stage: str, round_index: int, _actors: dict) -> None:
            if stage == "calibrate" and round_index == 1:
                time.sleep(0.5)  # let every client get into its step
                mem.working = mem.sample()
                mem.peak = max(mem.peak, mem.working)

        result = Federation(str(model), source, str(store), settings, snapshot_while_calibrating).run()
    seconds = time.perf_counter() - start
    stage1 = result.rounds[0].seconds
    return {
        "seconds": seconds,
        "peak_pss": mem.peak,
        "working_pss": mem.working,
        "extract_per_s": per_client * clients / stage1,
        "round_s": result.rounds[1].seconds,
        # every client is alive here, so shard_sizes[cid] is client cid's
        "sampled_examples": sum(result.summary["shard_sizes"][cid] for cid in result.rounds[1].clients_answered),
    }


def virtual(args, work: Path, data: Path, big: Path, tiny: Path, weight_bytes: int) -> None:
    """10 clients on their own hosts, then each of ``--virtual`` counts on ``--actors`` hosts, the same
    examples sampled per round (``--sampled`` clients' worth)."""
    print("clients | actors | sampled | wall s | peak PSS MiB | working PSS MiB | weight copies | round s | "
          "s/sampled ex | vs 10 clients")  # fmt: skip
    reference = None
    runs = [(k, actors) for k in args.virtual for actors in ((k, args.actors) if k <= 10 else (args.actors,))]
    for k, actors in runs:  # 10 clients: on their own hosts (the reference), then on --actors hosts
        fraction = min(1.0, args.sampled / k)
        extra = dict(actors=actors, fraction=fraction, min_clients=1, stage1_examples=args.stage1_examples)
        base = run_once(tiny, data, work / f"v-tiny-{k}-{actors}", k, "shared", args.per_client, **extra)
        r = run_once(big, data, work / f"v-big-{k}-{actors}", k, "shared", args.per_client, **extra)
        per_example = r["round_s"] / max(1, r["sampled_examples"])
        reference = reference or per_example
        copies = (r["working_pss"] - base["working_pss"]) / weight_bytes
        print(
            f"{k:>7} | {actors:>6} | {r['sampled_examples']:>7} | {r['seconds']:6.1f} | "
            f"{r['peak_pss'] / 2**20:12.0f} | {r['working_pss'] / 2**20:15.0f} | {copies:13.2f} | "
            f"{r['round_s']:7.2f} | {per_example:12.4f} | "
            f"{per_example / reference:12.2f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--per-client", type=int, default=8, help="training examples per client")
    parser.add_argument("--model", help="a named model, .gguf file or HF directory instead of the random bench model")
    parser.add_argument("--virtual", type=int, nargs="+", help="virtual-client runs: client counts (10 first)")
    parser.add_argument("--actors", type=int, default=2, help="hosts for the virtual clients beyond 10")
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled per round in the virtual runs")
    parser.add_argument("--stage1-examples", type=int, default=None, help="examples each client extracts from")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ifedicl-bench-"))
    most = max(args.virtual or args.clients)
    data = make_sentiment_dir(work / "data", n_train=args.per_client * most, n_test=4)
    texts = corpus(load_task_dir(data).task, load_task_dir(data).train.texts)
    if args.model:
        big = Path(resolve_model(args.model))
        weight_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))  # converted models are float32
    else:
        big = build_tiny_model(work / "big", texts, "llama", args.layers, args.hidden, 2048, dtype=torch.bfloat16)
        weight_bytes = 2 * sum(p.stat().st_size for p in big.glob("*.safetensors"))  # bf16 file, float32 in memory
    tiny = build_tiny_model(work / "tiny", texts, "llama", 1, 64, vocab_size=2048)
    print(f"bench model: {args.model or f'L={args.layers} d={args.hidden}'}, weights {weight_bytes / 2**20:.0f} MiB")
    if args.virtual:
        return virtual(args, work, data, big, tiny, weight_bytes)
    print("clients | mode      | wall s | peak PSS MiB | working PSS MiB | weight copies | extract ex/s | round s")
    for k in args.clients:
        base = run_once(tiny, data, work / f"s-tiny-{k}", k, "shared", args.per_client)
        for mode in ("shared", "per-actor"):
            r = run_once(big, data, work / f"s-{mode}-{k}", k, mode, args.per_client)
            copies = (r["working_pss"] - base["working_pss"]) / weight_bytes
            print(
                f"{k:>7} | {mode:<9} | {r['seconds']:6.1f} | {r['peak_pss'] / 2**20:12.0f} | "
                f"{r['working_pss'] / 2**20:15.0f} | {copies:13.2f} | "
                f"{r['extract_per_s']:12.1f} | {r['round_s']:7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
