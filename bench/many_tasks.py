"""Many tasks in one engine: IFed-ICL's task cache over the store, side by side with vLLM multi-LoRA.

Not a test: prints tables and ratios from one run, on a real model.

    python bench/many_tasks.py [--model smollm2-135m] [--tasks 1 10 100 1000] [--adapters 1 8 32]

1. A store with ``max(--tasks) + --cold`` published runs for the model, written through
   the Store API (kept in ``--store-dir`` and reused). Their vectors and Λ are random at a
   calibrated run's scale: speed does not depend on the values.
2. Plain vLLM: the stock model class; ``--prompts`` requests (one text each, label scoring
   as the server does it: ``max_tokens=1`` and the label words' logprobs) submitted together.
3. The injecting engine under :class:`ifedicl.serving.service.ClassificationService` over that
   store: start-up loads every task the slots hold; then the same requests with N distinct
   tasks mixed in the batch (request i under task i mod N) for each N of ``--tasks``, and
   row 0 (no task) on the same engine.
4. Cold vs warm: ``service.classify`` on a published task that is not resident (store read,
   engine write, scoring) vs the same task again, one request at a time.
5. Memory: engine table bytes per task, at the engine's slots, and how many tasks this
   machine's free memory would hold.
6. vLLM multi-LoRA on the same model (:mod:`bench.multi_lora`): rank-8 adapters on q and v,
   as FedAvg-LoRA produces them, 1, 8 and 32 distinct adapters per batch vs plain.

Every configuration is measured ``--repeats`` times, interleaved, and the median is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run as a script, sys.path[0] is bench/, whose serving.py would shadow the serving package.
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402

from bench.serving import make_prompts, resolve, summarize  # noqa: E402

ENGINE_SETTINGS = dict(
    max_model_len=1024,
    max_num_batched_tokens=4096,
    max_num_seqs=256,
    enable_prefix_caching=False,  # every configuration scores the same prompts: no reuse across sweeps
    gpu_memory_utilization=0.3,
    disable_log_stats=True,
    seed=0,
)


# ---------------------------------------------------------------------- the store
def task_name(i: int) -> str:
    return f"bench{i:05d}"


def published_store(store_dir: Path, model: str, count: int, dtype: str) -> tuple[str, float]:
    """A store with ``count`` published tasks for ``model`` (reused when it has them); seconds spent."""
    from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config
    from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec
    from ifedicl.storage.store import Store

    fp = fingerprint(canonical_model_id(model), load_config(model))
    uri = store_dir / f"{fp.config_hash}-{dtype}"
    store = Store(uri, create=True)
    have = set(store.published())
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    missing = [i for i in range(count) if task_name(i) not in have]
    for n, i in enumerate(missing, 1):
        spec = TaskSpec(task_name(i), *KNOWN_TASKS["sst2"])
        run_id = store.start_run(spec, fp, settings={"origin": "bench/many_tasks.py", "dtype": dtype})
        store.write_vectors(run_id, spec.name, rng.normal(0, 0.5, (fp.num_layers, 2, fp.hidden_size)))
        coefficients = np.empty((fp.num_layers, 2, 2), dtype=np.float32)
        coefficients[..., 0] = rng.uniform(0.05, 0.3, (fp.num_layers, 2))  # λ
        coefficients[..., 1] = rng.uniform(0.9, 1.1, (fp.num_layers, 2))  # β
        store.write_coefficients(run_id, spec.name, 1, coefficients)
        store.finish_run(run_id, {"dtype": dtype})
        store.publish(run_id)
        if n % 100 == 0 or n == len(missing):
            store.optimize()  # as the federation driver does after each run
            print(f"  store: {len(have) + n}/{count} tasks published", flush=True)
    return str(uri), time.perf_counter() - start


# ---------------------------------------------------------------------- measuring
async def score(engine, ids: list[int], label_ids: list[int], extra_args: dict | None = None, lora=None) -> float:
    """One request as the server sends it; its latency in seconds."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=label_ids, detokenize=False,
                            extra_args=extra_args)
    start = time.perf_counter()
    async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex, lora_request=lora):
        pass
    return time.perf_counter() - start


async def sweep(engine, prompts: list[list[int]], label_ids: list[int], extra_of=None, lora_of=None) -> dict:
    """All prompts submitted together (one batch); throughput and latency percentiles."""
    start = time.perf_counter()
    latencies = await asyncio.gather(*(
        score(engine, ids, label_ids, extra_of(i) if extra_of else None, lora_of(i) if lora_of else None)
        for i, ids in enumerate(prompts)
    ))  # fmt: skip
    return summarize(list(latencies), time.perf_counter() - start, len(prompts))


def median_stats(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def engine_args(model: Path, dtype: str, enforce_eager: bool, **extra):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(model=str(model), dtype=dtype, enforce_eager=enforce_eager, **ENGINE_SETTINGS, **extra)


async def measure_plain(model: Path, prompts, label_ids, opts) -> dict:
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args(model, opts.dtype, opts.enforce_eager))
    try:
        await sweep(engine, prompts[:32], label_ids)  # warm-up
        runs: dict[str, list[dict]] = {}
        for _ in range(opts.repeats):
            runs.setdefault("plain", []).append(await sweep(engine, prompts, label_ids))
            if not opts.skip_lora:  # LoRA's batch: the base it is compared with
                runs.setdefault("plain, LoRA's batch", []).append(
                    await sweep(engine, prompts[: opts.lora_prompts], label_ids)
                )
        return {name: median_stats(r) for name, r in runs.items()}
    finally:
        engine.shutdown()


async def measure_injected(model: Path, store_uri: str, prompts, texts, label_ids, opts) -> dict:
    """Mixes of N distinct tasks, row 0, start-up load, cold vs warm, on the injecting engine."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from ifedicl.kernel.modeling import load_config
    from ifedicl.model_patches.vllm_plugin import engine_overrides
    from ifedicl.model_patches.vllm_runner import TASK_ROW_KEY
    from ifedicl.serving.service import ClassificationService

    overrides = engine_overrides(load_config(str(model)).architectures, max_slots=opts.slots)
    engine = AsyncLLM.from_engine_args(engine_args(model, opts.dtype, opts.enforce_eager, **overrides))
    out: dict = {}
    try:
        service = ClassificationService(engine, str(model), store_uri, max_slots=opts.slots)
        start = time.perf_counter()
        report = await service.start()
        out["startup_s"] = time.perf_counter() - start
        out["published"], out["resident"] = len(report.live), len(service.table.resident)
        task_rows = {name: task.task_row for name, task in service.table.resident.items()}
        counts = [n for n in opts.tasks if n <= len(task_rows)]
        names = [task_name(i) for i in range(max(counts))]

        def mix(n: int):
            return lambda i: {TASK_ROW_KEY: task_rows[names[i % n]]}

        await sweep(engine, prompts[:32], label_ids, mix(1))  # warm-up
        runs: dict[str, list[dict]] = {}
        for _ in range(opts.repeats):  # interleaved, so drift hits every configuration alike
            runs.setdefault("row 0", []).append(await sweep(engine, prompts, label_ids, lambda i: {TASK_ROW_KEY: 0}))
            for n in counts:
                runs.setdefault(f"{n} tasks", []).append(await sweep(engine, prompts, label_ids, mix(n)))
        out["rows"] = {name: median_stats(r) for name, r in runs.items()}
        out["cold_warm"] = await cold_vs_warm(service, texts, opts.cold)
    finally:
        engine.shutdown()
    return out


async def cold_vs_warm(service, texts: list[str], count: int) -> dict:
    """Latency of a task's first request while not resident, then of its second, one at a time."""
    cold_names = sorted(set(service.catalog) - set(service.table.resident))[:count]
    cold, warm, loads = [], [], []

    def load_seconds() -> float:
        return service.metrics_registry.get_sample_value("ifedicl_task_load_seconds_sum") or 0.0

    for i, name in enumerate(cold_names):
        loads_before = load_seconds()
        start = time.perf_counter()
        await service.classify(name, [texts[i]])
        cold.append(time.perf_counter() - start)
        loads.append(load_seconds() - loads_before)
        start = time.perf_counter()
        await service.classify(name, [texts[i]])
        warm.append(time.perf_counter() - start)
    return {"tasks": len(cold_names), "cold_ms": 1000 * statistics.median(cold),
            "warm_ms": 1000 * statistics.median(warm), "load_ms": 1000 * statistics.median(loads)}


async def measure_lora(model: Path, prompts, label_ids, opts) -> dict:
    """vLLM multi-LoRA on the same prompts: every request under one of N adapters (never none: on CPU a
    batch mixing adapter and no-adapter requests scores the latter with an adapter, see bench/multi_lora.py)."""
    import tempfile

    from vllm.v1.engine.async_llm import AsyncLLM

    from bench.multi_lora import RANK, lora_requests, make_adapters

    with tempfile.TemporaryDirectory(prefix="ifedicl-bench-lora-") as tmp:
        requests = lora_requests(make_adapters(model, max(opts.adapters), out_dir=tmp))
        most = max(opts.adapters)
        lora = dict(enable_lora=True, max_loras=most, max_lora_rank=RANK, max_cpu_loras=most)
        engine = AsyncLLM.from_engine_args(engine_args(model, opts.dtype, True, **lora))
        try:
            def mix(n: int):
                return lambda i: requests[i % n]

            for n in opts.adapters:  # loads every adapter once, and warms up
                await sweep(engine, prompts[: max(32, n)], label_ids, lora_of=mix(n))
            runs: dict[str, list[dict]] = {}
            for _ in range(opts.repeats):
                for n in opts.adapters:
                    stats = await sweep(engine, prompts[: opts.lora_prompts], label_ids, lora_of=mix(n))
                    runs.setdefault(f"{n} adapters", []).append(stats)
            return {name: median_stats(r) for name, r in runs.items()}
        finally:
            engine.shutdown()


# ---------------------------------------------------------------------- report
def memory(model: str, dtype: str, slots: int) -> dict:
    from ifedicl.kernel.modeling import canonical_model_id, fingerprint, load_config
    from ifedicl.model_patches.vllm_plugin import table_bytes_per_slot

    fp = fingerprint(canonical_model_id(model), load_config(model))
    per_task = table_bytes_per_slot(fp.num_layers, fp.hidden_size, 4 if dtype == "float32" else 2)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"per_task": per_task, "at_slots": per_task * slots, "available": available,
            "fits": available // per_task}


def print_table(title: str, rows: dict[str, dict], base: dict) -> None:
    print(f"\n{title}")
    print(f"{'':>14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs plain':>9}")
    for name, r in rows.items():
        print(f"{name:>14} {r['req_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['req_s'] / base['req_s']:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="HF directory, GGUF file or installed model name")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompts", type=int, default=1000, help="requests per batch (all submitted together)")
    parser.add_argument("--lora-prompts", type=int, default=256, help="requests per multi-LoRA batch (slower)")
    parser.add_argument("--cold", type=int, default=20, help="published tasks beyond the slots, loaded on demand")
    parser.add_argument("--slots", type=int, default=None, help="engine task rows (default: max(--tasks))")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store-dir", default=str(Path.home() / ".cache" / "ifedicl" / "bench-stores"))
    parser.add_argument("--compiled", action="store_true",
                        help="compile plain and injecting engines (LoRA then skipped: vLLM CPU cannot compile it)")
    parser.add_argument("--skip-lora", action="store_true")
    opts = parser.parse_args()
    opts.slots = opts.slots or max(opts.tasks)
    opts.enforce_eager = not opts.compiled  # like for like with LoRA, which vLLM's CPU platform runs eager
    opts.skip_lora = opts.skip_lora or opts.compiled
    if opts.prompts < max(opts.tasks):
        parser.error(f"--prompts {opts.prompts} cannot mix {max(opts.tasks)} distinct tasks in one batch")

    from ifedicl.kernel.modeling import load_tokenizer
    from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec, label_token_ids

    model = resolve(opts.model)
    tokenizer = load_tokenizer(str(model))
    texts = make_prompts(opts.prompts)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    label_ids = label_token_ids(TaskSpec("sst2", *KNOWN_TASKS["sst2"]), tokenizer)
    print(f"model: {opts.model} ({model}), {opts.dtype}, vLLM {'eager' if opts.enforce_eager else 'compiled'}; "
          f"{len(prompts)} requests per batch, {np.mean([len(p) for p in prompts]):.0f} tokens on average; "
          f"median of {opts.repeats}", flush=True)
    store_uri, store_s = published_store(Path(opts.store_dir), str(model), opts.slots + opts.cold, opts.dtype)
    print(f"store: {store_uri} ({opts.slots + opts.cold} published tasks; {store_s:.0f} s to write what was missing)")

    plain_rows = asyncio.run(measure_plain(model, prompts, label_ids, opts))
    plain = plain_rows["plain"]
    injected = asyncio.run(measure_injected(model, store_uri, prompts, texts, label_ids, opts))
    print_table("IFed-ICL: N distinct tasks mixed in every batch (injecting engine)",
                {"plain vLLM": plain, **injected["rows"]}, plain)
    print(f"\nstart-up: {injected['resident']} of {injected['published']} published tasks loaded into "
          f"{opts.slots} slots in {injected['startup_s']:.1f} s")
    cw = injected["cold_warm"]
    print(f"cold vs warm ({cw['tasks']} tasks not resident, one request each, then again): cold "
          f"{cw['cold_ms']:.1f} ms, warm {cw['warm_ms']:.1f} ms, cold - warm {cw['cold_ms'] - cw['warm_ms']:.1f} ms "
          f"(of which store read + engine write {cw['load_ms']:.1f} ms)")
    mem = memory(str(model), opts.dtype, opts.slots)
    print(f"memory: {mem['per_task']:,} B of engine tables per task ({opts.dtype}); {mem['at_slots'] / 2**20:.1f} MiB "
          f"at {opts.slots} slots; this machine's {mem['available'] / 2**30:.1f} GiB free would hold "
          f"{mem['fits']:,} tasks (the engine caps slots at 65,536)")

    if not opts.skip_lora:
        lora = asyncio.run(measure_lora(model, prompts, label_ids, opts))
        lora_base = plain_rows["plain, LoRA's batch"]
        print_table(f"vLLM multi-LoRA: N distinct rank-8 adapters (q, v) mixed in every batch of {opts.lora_prompts} "
                    "(eager: vLLM's CPU platform turns compilation off with LoRA)",
                    {"plain vLLM": lora_base, **lora}, lora_base)
        print("\nside by side (throughput, x plain vLLM on the same batch)")
        for n in sorted(set(opts.tasks) | set(opts.adapters)):
            ifed_row, lora_row = injected["rows"].get(f"{n} tasks"), lora.get(f"{n} adapters")
            cells = [f"IFed-ICL {ifed_row['req_s'] / plain['req_s']:.3f}" if ifed_row else "",
                     f"multi-LoRA {lora_row['req_s'] / lora_base['req_s']:.3f}" if lora_row else ""]
            print(f"{n:>6} distinct: " + "   ".join(c for c in cells if c))


if __name__ == "__main__":
    main()
