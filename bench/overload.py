"""Overload a real ``ifedicl serve`` on loopback: is the in-flight cap held, and does anything 5xx?

Not a test: prints counts and ratios from one run. A random 2-layer Llama and two
published tasks; the server runs with ``--max-requests-in-flight CAP``; ``--loops``
concurrent client loops (several times the cap) each send ``--requests`` requests back to
back, without honouring ``Retry-After`` (an impatient client). One request in ``--hostile``
is hostile: 100,000-deep JSON, a million ``{}``, a base-model request with ``cache_salt``
or ``vllm_xargs.task_row``, too many inputs. A probe loop sends ``GET /v1/models`` (no
engine work, answered at once when admitted) every 20 ms: a probe refused with 429 found the
server holding CAP requests at that instant, so the refused share is the share of the storm
spent at the cap (the guard admits a request only below the cap, so never above it). After
the storm, a probe must be served (no slot leaked by a refused, hostile or abandoned request).

    python bench/overload.py [--cap 8] [--loops 32] [--requests 40] [--hostile 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run as a script, sys.path[0] is bench/, whose serving.py would shadow the serving package.
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.many_tasks import published_store, task_name  # noqa: E402
from bench.serving import build_model, make_prompts  # noqa: E402
from ifedicl.serving.process import ServeProcess, ready  # noqa: E402


def hostile_request(i: int, base: str) -> tuple[str, dict]:
    """The i-th hostile request: (path, httpx kwargs); each must be refused with a 4xx, never served or 5xx."""
    kinds = [
        ("/v1/classify", {"content": b"[" * 100_000 + b"]" * 100_000}),
        ("/v1/classify", {"content": b'{"model": "' + task_name(0).encode() + b'", "input": [' + b"{}," * 600_000
                          + b"{}]}"}),
        ("/v1/completions", {"json": {"model": base, "prompt": "x", "max_tokens": 1, "cache_salt": "mine"}}),
        ("/v1/completions", {"json": {"model": base, "prompt": "x", "max_tokens": 1, "vllm_xargs": {"task_row": 1}}}),
        ("/v1/completions", {"json": {"model": base, "prompt": ["x"] * 10_000, "max_tokens": 1}}),
    ]  # fmt: skip
    return kinds[i % len(kinds)]


async def probe(base_url: str, stop: asyncio.Event, seen: Counter) -> None:
    """``GET /v1/models`` every 20 ms until ``stop``: 429 means CAP requests were in flight right then."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            seen[(await client.get("/v1/models")).status_code] += 1
            await asyncio.sleep(0.02)


async def overload(base_url: str, base: str, prompts: list[str], opts) -> tuple[Counter, list[float], Counter]:
    statuses: Counter = Counter()
    served_latency: list[float] = []
    probes: Counter = Counter()
    limits = httpx.Limits(max_connections=opts.loops + 4, max_keepalive_connections=opts.loops + 4)

    async def loop(index: int, client: httpx.AsyncClient) -> None:
        for j in range(opts.requests):
            n = index * opts.requests + j
            if opts.hostile and n % opts.hostile == 0:
                path, kwargs = hostile_request(n // opts.hostile, base)
            else:
                path, kwargs = "/v1/classify", {"json": {"model": task_name(n % 2), "input": prompts[n % len(prompts)]}}
            start = time.perf_counter()
            try:
                response = await client.post(path, headers={"content-type": "application/json"}, **kwargs)
            except httpx.HTTPError as err:
                statuses[f"transport error {type(err).__name__}"] += 1
                continue
            statuses[response.status_code] += 1
            if response.status_code == 200:
                served_latency.append(time.perf_counter() - start)

    stop = asyncio.Event()
    prober = asyncio.create_task(probe(base_url, stop, probes))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600) as client:
        await asyncio.gather(*(loop(i, client) for i in range(opts.loops)))
    stop.set()
    await prober
    return statuses, served_latency, probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=8, help="--max-requests-in-flight of the server")
    parser.add_argument("--loops", type=int, default=32, help="concurrent client loops")
    parser.add_argument("--requests", type=int, default=40, help="requests per loop")
    parser.add_argument("--hostile", type=int, default=5, help="one request in this many is hostile (0: none)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root, layers=2, hidden=128, dtype=torch.float32)
        store, _ = published_store(root / "store", str(model), 2, "float32")
        args = [
            "--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--max-slots", "4",
            "--max-requests-in-flight", str(opts.cap), "--poll-interval", "0", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        with ready(ServeProcess(store, model, root / "server.log", args)) as server:
            start = time.perf_counter()
            statuses, latency, probes = asyncio.run(overload(server.base_url, str(model), make_prompts(64), opts))
            wall = time.perf_counter() - start
            after = httpx.get(f"{server.base_url}/v1/models", timeout=30).status_code
    total = sum(statuses.values())
    server_errors = sum(v for k, v in statuses.items() if not isinstance(k, int) or k >= 500)
    hostile = sum(1 for i in range(opts.loops * opts.requests) if opts.hostile and i % opts.hostile == 0)
    print(f"server: --max-requests-in-flight {opts.cap}; clients: {opts.loops} loops x {opts.requests} requests "
          f"({hostile} hostile), {wall:.1f} s, {total / wall:.1f} answers/s")  # fmt: skip
    print("| status | count | share |")
    print("|---|---|---|")
    for status, count in sorted(statuses.items(), key=lambda kv: str(kv[0])):
        print(f"| {status} | {count} | {count / total:.3f} |")
    print(f"5xx or transport errors: {server_errors}")
    at_cap = probes[429] / max(1, sum(probes.values()))
    others = {k: v for k, v in probes.items() if k != 429}
    print(f"probes during the storm: {sum(probes.values())}, refused with 429 (server at the cap) {probes[429]}: "
          f"held at the cap {at_cap:.3f} of the time; other probe statuses {others}")  # fmt: skip
    print(f"after the storm: GET /v1/models -> {after} (no slot leaked)" if after == 200 else f"after: {after}")
    if latency:
        ordered = sorted(latency)
        print(f"served: p50 {ordered[len(ordered) // 2]:.3f} s, p99 {ordered[int(0.99 * (len(ordered) - 1))]:.3f} s")


if __name__ == "__main__":
    main()
