"""The ``ifedicl serve`` process: vLLM's OpenAI server, an injecting engine, our routes.

Reused from vLLM as is: its argument parser (every engine/server flag passes
through), ``build_async_engine_client`` (AsyncLLM with the engine core in its
own process), ``build_app`` + ``init_app_state`` (OpenAI routes, health,
tokenize, exception handlers, ``/metrics`` with the ``vllm:*`` metrics), and
``serve_http`` (uvicorn with vLLM's shutdown handling). Added: the engine
overrides that select the injecting model class, the start-up liveness check,
the task routes (:mod:`ifedicl.serving.api`) and the store poller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.model_source import resolve_model
from ifedicl.kernel.modeling import fingerprint, load_config
from ifedicl.model_patches.vllm_plugin import (
    DEFAULT_TABLE_MEMORY,
    MAX_SLOTS_KEY,
    MAX_SLOTS_LIMIT,
    WORKER_EXTENSION,
    UnsupportedModelError,
    engine_overrides,
    slots_for_memory,
)
from ifedicl.serving.guards import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_REQUESTS_IN_FLIGHT
from ifedicl.serving.quality import default_serving_dtype
from ifedicl.serving.service import DEFAULT_MAX_INPUTS
from ifedicl.serving.task_cache import DEFAULT_SLOT_WAIT_SECONDS
from ifedicl.storage.store import Store

logger = logging.getLogger("ifedicl.serving")


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask of the server (``--max-inputs-per-request``, ``--max-body-bytes``),
    how many it works on at once (``--max-requests-in-flight``) and how long one may wait for a
    task row when all are in use (``--slot-wait-seconds``)."""

    max_inputs: int = DEFAULT_MAX_INPUTS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    slot_wait_seconds: float = DEFAULT_SLOT_WAIT_SECONDS
    max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT

    def validate(self) -> None:
        if self.max_inputs < 1:
            raise IfediclError(f"--max-inputs-per-request must be >= 1, got {self.max_inputs}")
        if self.max_body_bytes < 1024:
            raise IfediclError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.slot_wait_seconds > 0:
            raise IfediclError(f"--slot-wait-seconds must be > 0, got {self.slot_wait_seconds}")
        if self.max_requests_in_flight < 1:
            raise IfediclError(f"--max-requests-in-flight must be >= 1, got {self.max_requests_in_flight}")


ADMIN_API_KEY_ENV = "IFEDICL_ADMIN_API_KEY"


def add_server_flags(parser) -> None:
    """``ifedicl serve`` flags read here rather than by vLLM (they reach this parser with vLLM's own)."""
    group = parser.add_argument_group("ifedicl server")
    group.add_argument(
        "--max-requests-in-flight",
        type=int,
        default=None,
        help=f"HTTP requests worked on at once, all routes together; more get 429 with Retry-After "
        f"(default {DEFAULT_MAX_REQUESTS_IN_FLIGHT}; /health and /metrics never count)",
    )
    group.add_argument(
        "--admin-api-key",
        default=None,
        help=f"the only key /admin/reload accepts (default: ${ADMIN_API_KEY_ENV}; neither set: the API key)",
    )


def admin_api_keys(args) -> list[str]:
    """``--admin-api-key`` wins over ``IFEDICL_ADMIN_API_KEY``; empty: ``/admin/reload`` takes the API key."""
    key = getattr(args, "admin_api_key", None) or os.environ.get(ADMIN_API_KEY_ENV, "")
    return [key] if key else []


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (vLLM's ``--host``; None or empty: every interface) only listens on this machine."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_exposed(args) -> bool:
    """Log a WARNING when the server listens beyond this machine without an API key; True if it did."""
    if getattr(args, "uds", None) or is_loopback(args.host) or api_keys(args):
        return False
    admin = "an admin key guards /admin/reload" if admin_api_keys(args) else "/admin/reload is open too"
    logger.warning(
        "ifedicl: NO API KEY on a non-loopback address (--host %s): anyone who can reach port %s can classify, "
        "generate with the base model and fill the engine (%s). Pass --api-key (or VLLM_API_KEY), or "
        "--host 127.0.0.1 behind an authenticating proxy",
        args.host or "(all interfaces)", args.port, admin,
    )  # fmt: skip
    return True


def api_keys(args) -> list[str]:
    """vLLM's rule: ``--api-key`` (repeatable) wins over ``VLLM_API_KEY``."""
    import vllm.envs as envs

    return [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]

# vLLM's CPU backend sizes its KV cache with VLLM_CPU_KVCACHE_SPACE; this default
# keeps its memory check satisfied on a 24 GB machine (docs/design.md, "Per-request task injection in vLLM").
CPU_GPU_MEMORY_UTILIZATION = 0.3
# vLLM's CPU backend keeps one core away from the model for its scheduler process unless told otherwise:
# on a small machine that is half of it (2 cores: the demo's 200 Subj texts classify in 48 s on one core,
# 27 s on both). The CPU image sets the same (deploy/docker/serving-cpu.Dockerfile); an explicit setting wins.
CPU_RESERVED_CORES = "0"
# Bytes per value of the engine dtypes vLLM accepts (its aliases included).
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse_engine_args(
    model: str,
    host: str,
    port: int,
    max_slots: int | None,
    engine_args: list[str],
    run_dtype: str | None = None,
    table_memory: int = DEFAULT_TABLE_MEMORY,
):
    """vLLM's server arguments for ``model`` plus the overrides that turn injection on.

    ``run_dtype`` (the published runs' dtype) is the engine's dtype unless ``--dtype`` is given.
    ``max_slots`` None: as many task rows as ``table_memory`` bytes hold in that dtype.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="ifedicl serve"))
    add_server_flags(parser)
    # A named model or a GGUF file is served from its converted directory, under the name the user gave.
    model_dir = resolve_model(model)
    argv = ["--model", model_dir, "--host", host, "--port", str(port), *engine_args]
    if model_dir != model and not _has_flag(engine_args, "--served-model-name"):
        argv += ["--served-model-name", model]
    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", CPU_RESERVED_CORES)  # the engine's processes inherit it
        if not _has_flag(engine_args, "--gpu-memory-utilization"):
            argv += ["--gpu-memory-utilization", str(CPU_GPU_MEMORY_UTILIZATION)]
    if not _has_flag(engine_args, "--dtype") and run_dtype is not None:
        argv += ["--dtype", run_dtype]  # vLLM's "auto" would downcast a float32 checkpoint
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    config = load_config(args.model)
    try:
        if max_slots is None:
            fp = fingerprint(args.model, config)
            itemsize = DTYPE_BYTES.get(str(args.dtype), 4)  # "auto": sized for the widest it may pick
            max_slots = slots_for_memory(table_memory, fp.num_layers, fp.hidden_size, itemsize)
        overrides = engine_overrides(config.architectures, max_slots=max_slots)
    except (UnsupportedModelError, ValueError) as err:
        raise IfediclError(str(err)) from None
    user = args.hf_overrides
    if isinstance(user, str):
        user = json.loads(user)
    if user is not None and not isinstance(user, dict):
        raise IfediclError("--hf-overrides must be a JSON object when serving with injection")
    args.hf_overrides = {**(user or {}), **overrides["hf_overrides"]}
    if args.worker_extension_cls not in (None, "", WORKER_EXTENSION):
        raise IfediclError(f"--worker-extension-cls is taken by IFed-ICL ({WORKER_EXTENSION})")
    args.worker_extension_cls = overrides["worker_extension_cls"]
    validate_parsed_serve_args(args)
    return args


async def serve_async(
    args,
    store: str,
    poll_interval: float,
    limits: ServingLimits,
    routing_index: str | None = None,
) -> None:
    """Start the engine, check injection, load the store, serve until shut down."""
    import vllm.envs as envs
    from starlette.middleware import Middleware
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from ifedicl.serving.api import http_error, install_routes
    from ifedicl.serving.guards import EngineIsolation, RequestGuard
    from ifedicl.serving.metrics import UNKNOWN_TASK_LABEL
    from ifedicl.serving.service import ClassificationService

    listen_address, sock = setup_server(args, reuse_port=False)
    poller = None
    async with build_async_engine_client(args) as engine:
        # Every engine request, whatever route it came by, is salted from a secret; only the service's carry a row.
        isolation = EngineIsolation()
        isolation.install(engine)
        service = ClassificationService(
            isolation.internal(engine),
            args.model,
            store,
            max_slots=args.hf_overrides[MAX_SLOTS_KEY],
            registry=get_prometheus_registry(),
            max_inputs=limits.max_inputs,
            slot_wait_seconds=limits.slot_wait_seconds,
        )
        if routing_index is not None:
            from ifedicl.serving.router import TaskRouter

            dtype = str(engine.model_config.dtype).removeprefix("torch.")
            service.router = await asyncio.to_thread(TaskRouter, args.model, dtype, routing_index)
        report = await service.start()
        logger.info("ifedicl: serving tasks %s (refused: %s)", report.live, report.failed or "none")
        supported = await engine.get_supported_tasks()
        app = build_app(args, supported, engine.model_config)

        def refused(endpoint: str, status: int) -> None:
            service.metrics.requests.labels(UNKNOWN_TASK_LABEL, endpoint).inc()
            service.metrics.errors.labels(UNKNOWN_TASK_LABEL, endpoint, str(status)).inc()

        # Outermost: a refused request never reaches vLLM's middleware or a route. build_app
        # already built Starlette's middleware stack, so insert and let it be rebuilt lazily.
        guard = Middleware(
            RequestGuard,
            answer=http_error,
            api_keys=api_keys(args),
            admin_api_keys=admin_api_keys(args),
            max_body_bytes=limits.max_body_bytes,
            max_requests_in_flight=limits.max_requests_in_flight,
            max_inputs=limits.max_inputs,
            on_refused=refused,
        )
        app.user_middleware.insert(0, guard)
        app.middleware_stack = None
        await init_app_state(engine, app.state, args, supported)
        install_routes(app, service, list(args.served_model_name or [args.model]))
        app.state.ifedicl = service
        if poll_interval > 0:
            poller = asyncio.create_task(service.poll_forever(poll_interval))
        logger.info("ifedicl: listening on %s", listen_address)
        shutdown = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
        )
    try:
        await shutdown
    finally:
        if poller is not None:
            poller.cancel()
        sock.close()


def run_server(
    *,
    store: str,
    model: str,
    host: str = "0.0.0.0",
    port: int = 8000,
    poll_interval: float = 30.0,
    max_slots: int | None = None,
    table_memory: int = DEFAULT_TABLE_MEMORY,
    limits: ServingLimits | None = None,
    auto_route: bool = False,
    routing_index: str | None = None,
    engine_args: list[str] | None = None,
) -> None:
    """Blocking entry of ``ifedicl serve``; bad settings raise :class:`IfediclError` before the engine starts."""
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    published = Store(store)  # a missing store is a one-line error, not an engine start-up
    if max_slots is not None and not 1 <= max_slots <= MAX_SLOTS_LIMIT:
        raise IfediclError(f"--max-slots must be in 1..{MAX_SLOTS_LIMIT}, got {max_slots}")
    limits = limits or ServingLimits()
    limits.validate()
    cli_env_setup()
    args = parse_engine_args(
        model,
        host,
        port,
        max_slots,
        list(engine_args or []),
        run_dtype=default_serving_dtype(published),
        table_memory=table_memory,
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.max_requests_in_flight is not None:
        limits = dataclasses.replace(limits, max_requests_in_flight=args.max_requests_in_flight)
        limits.validate()
    warn_if_exposed(args)
    if auto_route and routing_index is None:
        routing_index = tempfile.mkdtemp(prefix="ifedicl-routing-")
    logger.info("ifedicl: the engine holds %d task versions at once", args.hf_overrides[MAX_SLOTS_KEY])
    uvloop.run(serve_async(args, store, poll_interval, limits, routing_index if auto_route else None))
