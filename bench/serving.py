"""Serving benchmark: label scoring throughput and latency, injected vs plain vLLM vs HF hooks.

Not a test: prints a table and the ratios the issue asks for. By default realistic
shapes with random weights (speed does not depend on weight values): a 12-layer,
d=768 Llama in bfloat16, prompts of ~40-120 tokens. ``--model`` takes real weights
instead (an HF directory, a GGUF file or an installed model name such as
``smollm2-135m``) and runs every row in each of ``--dtypes`` side by side; with
``--store`` and ``--task`` it also scores that task's published run on its
held-out split through the injecting engine in each dtype (the accuracy clients
of ``ifedicl serve --dtype D`` get).

    python bench/serving.py [--layers 12 --hidden 768 --prompts 256 --batch-sizes 1 16 64 256]
    python bench/serving.py --model smollm2-135m --dtypes float32 bfloat16 --store ./store --task subj

For each batch size B, B requests are submitted together and awaited (closed
loop) until all prompts are scored; req/s = prompts / wall time, latency = per
request, submit to result. Rows:
- vLLM plain: the stock model class, no plugin model, same engine settings;
- vLLM injected, single task: the injecting class, every request under task 1;
- vLLM injected, mixed tasks: requests round-robin over 4 tasks (different rows per token);
- HF hooks: batched forward (B rows, right-padded) with the same injection tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run as a script, this directory (which holds bench/serving.py) would shadow the serving package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TASK_NAMES = ("sst2", "subj", "agnews", "trec")
WORDS = [
    'the', 'film', 'plot', 'actor', 'market', 'team', 'rates', 'bank',
    'season', 'story', 'scene', 'music', 'price', 'game', 'city', 'court',
]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec

    rng = np.random.default_rng(seed)
    spec = TaskSpec("sst2", *KNOWN_TASKS["sst2"])
    return [spec.prompt(" ".join(rng.choice(WORDS, size=int(rng.integers(30, 100))))) for _ in range(n)]


def build_model(root: Path, layers: int, hidden: int, dtype: torch.dtype) -> Path:
    from ifedicl.devkit.tiny_model import build_tiny_model
    from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec

    texts = []
    for name in TASK_NAMES:
        spec = TaskSpec(name, *KNOWN_TASKS[name])
        texts += [spec.demonstration(" ".join(WORDS), i) for i in range(len(spec.labels))]
    texts += make_prompts(200, seed=1)
    return build_tiny_model(root / "model", texts * 5, family="llama", num_layers=layers, hidden_size=hidden,
                            vocab_size=4096, dtype=dtype, max_positions=2048)


def random_tables(num_layers: int, hidden: int, tasks: int):
    from ifedicl.model_patches.injection import InjectionTables

    rng = np.random.default_rng(0)
    vectors = [torch.from_numpy(rng.normal(0, 1, (num_layers, 2, hidden)).astype(np.float32)) for _ in range(tasks)]
    coeffs = []
    for _ in range(tasks):
        c = np.empty((num_layers, 2, 2), dtype=np.float32)
        c[..., 0] = rng.uniform(0.05, 0.3, (num_layers, 2))
        c[..., 1] = rng.uniform(0.9, 1.1, (num_layers, 2))
        coeffs.append(torch.from_numpy(c))
    return InjectionTables.build(vectors, coeffs)


def summarize(latencies: list[float], wall: float, n: int) -> dict:
    lat = sorted(latencies)
    return {
        "req_s": n / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


async def run_vllm(model: Path, prompts: list[list[int]], label_ids: list[int], batch_sizes, injected: bool,
                   dtype: str, mixed_rows: int, enforce_eager: bool, held_out=None) -> dict:
    """Per batch size: {"single": stats, "mixed": stats} (injected) or {"plain": stats}.

    ``held_out`` (injected only): ``(run, encoded texts, labels)``: the run is written into
    its own row and its held-out accuracy through this engine is returned under "accuracy".
    """
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from ifedicl.kernel.modeling import load_config
    from ifedicl.model_patches.injection import InjectionTables
    from ifedicl.model_patches.vllm_plugin import engine_overrides
    from ifedicl.model_patches.vllm_runner import TASK_ROW_KEY
    from ifedicl.model_patches.vllm_worker import pack_tables

    config = load_config(str(model))
    extra = engine_overrides(config.architectures, max_slots=len(TASK_NAMES) + 1) if injected else {}
    args = AsyncEngineArgs(model=str(model), dtype=dtype, max_model_len=1024, max_num_batched_tokens=4096,
                           max_num_seqs=256, enable_prefix_caching=False, enforce_eager=enforce_eager,
                           gpu_memory_utilization=0.3, disable_log_stats=True, seed=0, **extra)
    engine = AsyncLLM.from_engine_args(args)
    try:
        if injected:
            tables = random_tables(config.num_hidden_layers, config.hidden_size, len(TASK_NAMES))
            rows = list(range(1, len(TASK_NAMES) + 1))
            await engine.collective_rpc("ifedicl_write_rows",
                                        args=(rows, *pack_tables(tables.beta[:, :, 1:], tables.shift[:, :, 1:])))
            if held_out is not None:
                run, _, _ = held_out
                real = InjectionTables.build([torch.from_numpy(run.vectors)], [torch.from_numpy(run.coefficients)])
                await engine.collective_rpc("ifedicl_write_rows", args=(
                    [len(TASK_NAMES) + 1], *pack_tables(real.beta[:, :, 1:], real.shift[:, :, 1:])))

        async def score(ids: list[int], row: int, labels: list[int] = label_ids) -> float:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=labels, detokenize=False,
                                    extra_args={TASK_ROW_KEY: row} if injected else None)
            start = time.perf_counter()
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
                pass
            return time.perf_counter() - start

        async def label_of(ids: list[int], row: int, labels: list[int]) -> int:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=labels, detokenize=False,
                                    extra_args={TASK_ROW_KEY: row})
            final = None
            async for output in engine.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
                final = output
            step = final.outputs[0].logprobs[0]
            return int(np.argmax([step[i].logprob for i in labels]))

        async def sweep(batch: int, row_of) -> dict:
            n = len(prompts) if batch > 1 else min(len(prompts), 64)
            latencies: list[float] = []
            wall_start = time.perf_counter()
            for start in range(0, n, batch):
                chunk = range(start, min(n, start + batch))
                latencies += await asyncio.gather(*(score(prompts[i], row_of(i)) for i in chunk))
            return summarize(latencies, time.perf_counter() - wall_start, n)

        await sweep(8, lambda i: 0)  # warm-up
        out = {}
        for batch in batch_sizes:
            if injected:
                out[batch] = {"single": await sweep(batch, lambda i: 1),
                              "mixed": await sweep(batch, lambda i: 1 + i % mixed_rows)}
            else:
                out[batch] = {"plain": await sweep(batch, lambda i: 0)}
        if injected and held_out is not None:
            from ifedicl.kernel.modeling import load_tokenizer
            from ifedicl.kernel.task import label_token_ids

            run, encoded, labels = held_out
            task_labels = label_token_ids(run.task, load_tokenizer(str(model)))
            predicted = await asyncio.gather(*(label_of(ids, len(TASK_NAMES) + 1, task_labels) for ids in encoded))
            out["accuracy"] = float(np.mean(np.asarray(predicted) == np.asarray(labels)))
        return out
    finally:
        engine.shutdown()


def run_hf(model: Path, texts: list[str], label_ids: list[int], batch_sizes, dtype: torch.dtype) -> dict:
    from ifedicl.kernel.modeling import load_model, load_tokenizer
    from ifedicl.model_patches.hf import HFContextModel
    from ifedicl.model_patches.inference import label_logits

    torch.set_num_threads(2)
    tokenizer = load_tokenizer(str(model))
    ctx = HFContextModel(load_model(str(model), "bfloat16" if dtype == torch.bfloat16 else "float32"))
    tables = random_tables(ctx.num_layers, ctx.hidden_size, len(TASK_NAMES))
    out = {}
    with torch.no_grad():
        label_logits(ctx, tokenizer, texts[:8], label_ids, tables, torch.ones(8, dtype=torch.long))  # warm-up
        for batch in batch_sizes:
            n = len(texts) if batch > 1 else min(len(texts), 64)
            latencies = []
            wall_start = time.perf_counter()
            for start in range(0, n, batch):
                chunk = texts[start : start + batch]
                index = torch.as_tensor([1 + i % len(TASK_NAMES) for i in range(len(chunk))])
                t0 = time.perf_counter()
                label_logits(ctx, tokenizer, chunk, label_ids, tables, index)
                latencies += [time.perf_counter() - t0] * len(chunk)
            out[batch] = {"hf": summarize(latencies, time.perf_counter() - wall_start, n)}
    return out


def resolve(model: str) -> Path:
    """An HF directory, a GGUF file or an installed model name -> the directory both backends load."""
    try:
        from ifedicl.kernel.model_source import resolve_model
    except ImportError:  # before model sources existed: HF directories only
        return Path(model)
    return Path(resolve_model(model))


def held_out(store_uri: str, task: str, model: Path, max_texts: int):
    """The published run of ``task`` and its held-out split, tokenized as the server does."""
    from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config, load_tokenizer
    from ifedicl.serving.quality import held_out_split
    from ifedicl.storage.store import Store

    expect = fingerprint(canonical_model_id(str(model)), load_config(str(model)))
    run = Store(store_uri).load_run(task, expect=expect)
    test = held_out_split(run).head(max_texts)
    tokenizer = load_tokenizer(str(model))
    return run, [tokenizer(run.task.prompt(t))["input_ids"][-1023:] for t in test.texts], test.labels


def measure(model: Path, dtype: str, opts, texts: list[str], prompts, label_ids, run_data) -> dict:
    """Every row (plain, single, mixed, HF) per batch size in ``dtype``, plus "accuracy" with a run."""
    results: dict = {b: {} for b in opts.batch_sizes}
    for injected in (False, True):
        part = asyncio.run(run_vllm(model, prompts, label_ids, opts.batch_sizes, injected, dtype,
                                    len(TASK_NAMES), opts.enforce_eager, run_data if injected else None))
        if "accuracy" in part:
            results["accuracy"] = part.pop("accuracy")
        for b, rows in part.items():
            results[b].update(rows)
    if not opts.skip_hf:
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        for b, rows in run_hf(model, texts, label_ids, opts.batch_sizes, torch_dtype).items():
            results[b].update(rows)
    return results


def report(results: dict, opts) -> None:
    names = ["plain", "single", "mixed"] + ([] if opts.skip_hf else ["hf"])
    print(f"\n{'batch':>6} " + " ".join(f"{n + ' req/s':>13} {'p50 ms':>8} {'p99 ms':>8}" for n in names))
    for b in opts.batch_sizes:
        cells = " ".join(f"{results[b][n]['req_s']:>13.1f} {results[b][n]['p50_ms']:>8.1f} "
                         f"{results[b][n]['p99_ms']:>8.1f}" for n in names)
        print(f"{b:>6} {cells}")
    print("\nratios (throughput)")
    header = f"{'batch':>6} {'injected/plain':>15} {'mixed/single':>13}"
    print(header + ("" if opts.skip_hf else f" {'vLLM inj/HF':>12}"))
    for b in opts.batch_sizes:
        r = results[b]
        inj, mix = r["single"]["req_s"] / r["plain"]["req_s"], r["mixed"]["req_s"] / r["single"]["req_s"]
        line = f"{b:>6} {inj:>15.3f} {mix:>13.3f}"
        if not opts.skip_hf:
            line += f" {r['mixed']['req_s'] / r['hf']['req_s']:>12.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="real weights: HF directory, GGUF file or installed model name")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="random model: its dtype")
    parser.add_argument("--dtypes", choices=["bfloat16", "float32"], nargs="+", default=["float32", "bfloat16"],
                        help="--model: the dtypes to run side by side")
    parser.add_argument("--store", help="--model: a store whose published --task run is scored in each dtype")
    parser.add_argument("--task", help="the task of --store to score")
    parser.add_argument("--max-eval", type=int, default=500, help="held-out texts scored per dtype")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation")
    parser.add_argument("--skip-hf", action="store_true")
    opts = parser.parse_args()
    if bool(opts.store) != bool(opts.task):
        parser.error("--store and --task go together")

    from ifedicl.kernel.modeling import load_tokenizer
    from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec, label_token_ids

    with tempfile.TemporaryDirectory() as tmp:
        if opts.model:
            model, dtypes = resolve(opts.model), opts.dtypes
            described = f"{opts.model} ({model})"
        else:
            torch_dtype = torch.bfloat16 if opts.dtype == "bfloat16" else torch.float32
            model, dtypes = build_model(Path(tmp), opts.layers, opts.hidden, torch_dtype), [opts.dtype]
            described = f"random llama L={opts.layers} d={opts.hidden}"
        tokenizer = load_tokenizer(str(model))
        texts = make_prompts(opts.prompts)
        prompts = [tokenizer(t)["input_ids"] for t in texts]
        label_ids = label_token_ids(TaskSpec("sst2", *KNOWN_TASKS["sst2"]), tokenizer)
        run_data = held_out(opts.store, opts.task, model, opts.max_eval) if opts.store else None
        print(f"model: {described}; {len(prompts)} prompts, {np.mean([len(p) for p in prompts]):.0f} tokens on "
              f"average; torch threads 2; vLLM {'eager' if opts.enforce_eager else 'compiled'}", flush=True)
        by_dtype = {}
        for dtype in dtypes:
            by_dtype[dtype] = measure(model, dtype, opts, texts, prompts, label_ids, run_data)
            print(f"\n== {dtype}")
            report(by_dtype[dtype], opts)

    if len(dtypes) > 1 or run_data is not None:
        top = max(opts.batch_sizes)
        print(f"\ndtypes side by side (req/s at batch 1 and {top}; accuracy: the published {opts.task} run, "
              f"{len(run_data[2]) if run_data else 0} held-out texts, through the injecting engine)")
        print(f"{'dtype':>9} {'plain b1':>9} {'inj b1':>9} {f'plain b{top}':>11} {f'inj b{top}':>11} {'accuracy':>9}")
        for dtype, r in by_dtype.items():
            first = min(opts.batch_sizes)
            acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
            print(f"{dtype:>9} {r[first]['plain']['req_s']:>9.1f} {r[first]['single']['req_s']:>9.1f} "
                  f"{r[top]['plain']['req_s']:>11.1f} {r[top]['single']['req_s']:>11.1f} {acc:>9}")
        if run_data is not None:
            from ifedicl.serving.quality import run_dtype

            run = run_data[0]
            made_in = run_dtype(run.summary, run.settings)
            print(f"run's own accuracy (recorded, {made_in}): {run.summary.get('accuracy')}")


if __name__ == "__main__":
    main()
