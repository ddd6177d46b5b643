"""The one internal seam: fill the per-token task row before every forward.

vLLM's ``GPUModelRunner._prepare_inputs`` (inherited by the CPU runner) turns the
scheduler's output into flat token inputs; right after it, the persistent batch
lists the scheduled requests in the order of their tokens and
``num_scheduled_tokens`` says how many tokens each contributes this step (a
whole prompt, a prefill chunk, or one decode token). Repeating each request's
table row by that count gives the per-token row for exactly the tokens in this
forward, whatever the mix of tasks, chunks and decodes.

The request's row is ``sampling_params.extra_args["task_row"]`` (0 or absent =
no injection). An out-of-range row is served plain and counted, never allowed to
crash the engine: the server only sends rows it has written.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

TASK_ROW_KEY = "task_row"  # extra_args key: the request's row in the injection tables


def request_task_row(sampling_params, num_rows: int) -> int:
    """The table row a request asks for: ``extra_args["task_row"]``, or -1 if invalid."""
    extra = getattr(sampling_params, "extra_args", None)
    if not extra:
        return 0
    value = extra.get(TASK_ROW_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_rows:
        return -1
    return value


def fill_token_task_rows(runner, num_scheduled_tokens: np.ndarray) -> None:
    """Write this step's per-token rows into the model's ``token_task_row`` buffer."""
    state = getattr(runner.get_model(), "ifedicl", None)
    if state is None:
        return
    num_reqs = runner.input_batch.num_reqs
    task_rows = np.zeros(num_reqs, dtype=np.int64)  # [num_reqs]
    for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
        request = runner.requests.get(req_id)
        task_row = request_task_row(request.sampling_params, state.num_rows) if request is not None else 0
        if task_row < 0:
            state.invalid_task_rows += 1
            logger.error("request %s: task_row out of range [0, %d); served without injection", req_id, state.num_rows)
            task_row = 0
        task_rows[i] = task_row
    per_token = np.repeat(task_rows, num_scheduled_tokens[:num_reqs])  # [num_tokens]
    count = per_token.shape[0]
    buffer: torch.Tensor = state.token_task_row  # [max_tokens]
    if buffer.device.type == "cpu":
        view = buffer.numpy()
        view[:count] = per_token
        view[count:] = 0  # padded positions, if the runner pads, stay plain
    else:
        staged = torch.zeros(buffer.shape[0], dtype=torch.long)
        staged[:count] = torch.from_numpy(per_token)
        buffer.copy_(staged, non_blocking=False)
    state.steps_filled += 1
    state.tokens_injected += int(np.count_nonzero(per_token))


def install_runner_seam() -> None:
    """Wrap ``GPUModelRunner._prepare_inputs`` once per process (CPU runner inherits it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_ifedicl_seam", False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        fill_token_task_rows(self, num_scheduled_tokens)
        return result

    _prepare_inputs._ifedicl_seam = True
    GPUModelRunner._prepare_inputs = _prepare_inputs
    logger.info("ifedicl: per-request injection seam installed on %s._prepare_inputs", GPUModelRunner.__name__)


def seam_installed() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return bool(getattr(GPUModelRunner._prepare_inputs, "_ifedicl_seam", False))
