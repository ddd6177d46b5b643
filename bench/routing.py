"""model="auto" routing on real tasks: accuracy of the nearest-task rule and the latency it adds.

Not a test: prints a table. For each task directory (task.json + train/test .jsonl), the
context vectors are computed as stage 1 computes them (mean block outputs at the last
token of ``--demos`` training demonstrations; one client, so equal to the federated mean
up to client weighting), indexed with :class:`ifedicl.storage.routing_index.TaskSignatureIndex`, and
``--test`` held-out texts per task are routed with :class:`ifedicl.serving.router.TaskRouter`
(the server's code). Also measured, as what to use when the vectors alone route poorly:
*text centroids*, the mean block outputs at the end of ``text + "\\n"`` over the same
training texts without template or label: a second per-task vector a client can
compute and upload exactly like its context vectors (same size, same privacy boundary).

    python bench/routing.py --model smollm2-135m --data ../shared/data --tasks sst2 subj agnews trec
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run as a script, this directory (which holds bench/serving.py) would shadow the serving package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def per_task(ctx, tokenizer, spec, train, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(context vectors, text centroids), each ``[L, 2, d]``, from the first ``n`` training rows."""
    from ifedicl.model_patches.inference import capture_sum
    from ifedicl.serving.router import query_text

    texts, labels = train.texts[:n], train.labels[:n]
    demos = [spec.demonstration(t, y) for t, y in zip(texts, labels)]
    vectors = capture_sum(ctx, tokenizer, demos) / len(demos)
    centroids = capture_sum(ctx, tokenizer, [query_text(t) for t in texts]) / len(texts)
    return vectors.numpy(), centroids.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF directory, GGUF file or installed model name")
    parser.add_argument("--data", default="../shared/data", help="directory of task directories")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "subj", "agnews", "trec"])
    parser.add_argument("--demos", type=int, default=64, help="training rows per task for the vectors")
    parser.add_argument("--test", type=int, default=50, help="held-out texts routed per task")
    parser.add_argument("--dtype", default="float32")
    opts = parser.parse_args()

    from ifedicl.kernel.data import load_task_dir
    from ifedicl.kernel.modeling import load_model, load_tokenizer
    from ifedicl.model_patches.hf import HFContextModel
    from ifedicl.serving.router import TaskRouter
    from ifedicl.storage.routing_index import TaskSignatureIndex

    torch.set_num_threads(2)
    try:
        from ifedicl.kernel.model_source import resolve_model

        model = resolve_model(opts.model)
    except ImportError:
        model = opts.model
    tokenizer = load_tokenizer(model)
    ctx = HFContextModel(load_model(model, opts.dtype))
    signatures, texts, gold = {"vectors": [], "centroids": []}, [], []
    for name in opts.tasks:
        data = load_task_dir(Path(opts.data) / name)
        vectors, centroids = per_task(ctx, tokenizer, data.task, data.train, opts.demos)
        signatures["vectors"].append((name, f"{name}-bench", vectors))
        signatures["centroids"].append((name, f"{name}-bench", centroids))
        texts += data.test.texts[: opts.test]
        gold += [name] * len(data.test.texts[: opts.test])
    ctx.remove_hooks()

    with tempfile.TemporaryDirectory() as tmp:
        router = TaskRouter(model, opts.dtype, Path(tmp) / "index")
        router.rebuild(signatures["vectors"])
        start = time.perf_counter()
        activations = router.activations(texts)  # [N, L, 2, d], batched 16
        batched_ms = 1000 * (time.perf_counter() - start) / len(texts)
        singles = texts[:: max(1, len(texts) // 40)]
        start = time.perf_counter()
        for text in singles:
            router.route([text])  # one request, one text: forward + LanceDB search
        single_ms = 1000 * (time.perf_counter() - start) / len(singles)
        num_layers = activations.shape[1]
        layer_sets = {
            "upper half": list(range(num_layers // 2, num_layers)),
            "all": list(range(num_layers)),
            "last (served)": [num_layers - 1],
            "middle": [num_layers // 2],
        }
        print(f"model {opts.model} ({opts.dtype}); tasks {opts.tasks}; {opts.demos} training rows per task; "
              f"{len(texts)} held-out texts ({opts.test} per task)")
        header = f"{'signature':<11} {'layers':<20} {'accuracy':>8} " + " ".join(f"{t:>8}" for t in opts.tasks)
        print(header)
        for kind, runs in signatures.items():
            for label, layers in layer_sets.items():
                index = TaskSignatureIndex(Path(tmp) / f"{kind}-{len(layers)}-{layers[0]}", layers)
                index.rebuild(runs)
                chosen = [r.task for r in index.nearest(activations)]
                hits = np.asarray(chosen) == np.asarray(gold)
                per = [hits[np.asarray(gold) == t].mean() for t in opts.tasks]
                print(f"{kind:<11} {label:<20} {hits.mean():>8.3f} " + " ".join(f"{p:>8.3f}" for p in per))
        print(f"\nadded latency (HF forward + LanceDB search, {opts.dtype}, 2 threads): "
              f"{single_ms:.1f} ms per single-text request; {batched_ms:.1f} ms per text batched by 16")


if __name__ == "__main__":
    main()
