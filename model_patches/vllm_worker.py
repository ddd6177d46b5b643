"""Worker-side RPCs for the injection buffers (``engine.collective_rpc("ifedicl_...")``).

vLLM mixes this class into its worker class (``worker_extension_cls``), so each
method runs in the worker that owns the model, between engine steps. Every name
starts with ``ifedicl_`` so it cannot clash with the worker's own attributes.

Tables are written *in place* into preallocated rows (never reallocated), so a
compiled graph keeps reading the same storage. The server writes a new version
of a task into a free row and moves traffic to it; the old row is only reused
after its in-flight requests finish, so no request is scored under two versions.
"""

from __future__ import annotations

import numpy as np
import torch

from ifedicl.model_patches.vllm_runner import seam_installed


class IfediclWorkerExtension:
    """Methods callable through ``collective_rpc`` on every worker."""

    def _ifedicl_state(self):
        state = getattr(self.model_runner.get_model(), "ifedicl", None)
        if state is None:
            raise RuntimeError(
                "the loaded model has no IFed-ICL injection buffers: start the engine with "
                "ifedicl.model_patches.vllm_plugin.engine_overrides(...)"
            )
        return state

    def ifedicl_info(self) -> dict:
        """Capacity and liveness counters of this worker's injection path."""
        state = self._ifedicl_state()
        first = state.layers[0]
        return {
            "seam_installed": seam_installed(),
            "max_slots": state.max_slots,
            "probe_row": state.probe_row,
            "num_layers": len(state.layers),
            "hidden_size": int(first.ifedicl_shift.shape[-1]),
            "dtype": str(first.ifedicl_shift.dtype).removeprefix("torch."),
            "steps_filled": state.steps_filled,
            "tokens_injected": state.tokens_injected,
            "invalid_task_rows": state.invalid_task_rows,
        }

    def ifedicl_write_rows(self, task_rows: list[int], beta: bytes, shift: bytes) -> int:
        """Write tables into ``task_rows``: float32 ``beta`` [L, 2, k], ``shift`` [L, 2, k, d] (i -> task_rows[i]).

        Arrays travel as raw float32 bytes (see :func:`pack_tables`): the RPC path
        between engine core and workers pickles arguments, and decoded arrays
        arrive as memoryviews that do not pickle.
        """
        state = self._ifedicl_state()
        num_layers, hidden = len(state.layers), state.layers[0].ifedicl_shift.shape[-1]
        k = len(task_rows)
        beta_t = torch.from_numpy(np.frombuffer(bytes(beta), dtype=np.float32).copy())
        shift_t = torch.from_numpy(np.frombuffer(bytes(shift), dtype=np.float32).copy())
        if beta_t.numel() != num_layers * 2 * k or shift_t.numel() != num_layers * 2 * k * hidden:
            raise ValueError(
                f"tables of {beta_t.numel()}/{shift_t.numel()} values do not fit L={num_layers}, d={hidden}, {k} rows"
            )
        beta_t, shift_t = beta_t.view(num_layers, 2, k), shift_t.view(num_layers, 2, k, hidden)
        for task_row in task_rows:
            if not 1 <= task_row <= state.max_slots:
                raise ValueError(f"task_row {task_row} outside 1..{state.max_slots} (the task rows, --max-slots)")
        if not (torch.isfinite(beta_t).all() and torch.isfinite(shift_t).all()):
            raise ValueError("tables contain NaN or inf")
        state.write_rows(list(task_rows), beta_t, shift_t)
        return k

    def ifedicl_clear_rows(self, task_rows: list[int]) -> int:
        """Reset ``task_rows`` to the plain model (β = 1, shift = 0)."""
        state = self._ifedicl_state()
        num_layers, hidden = len(state.layers), state.layers[0].ifedicl_shift.shape[-1]
        k = len(task_rows)
        state.write_rows(list(task_rows), torch.ones(num_layers, 2, k), torch.zeros(num_layers, 2, k, hidden))
        return k


def pack_tables(beta: np.ndarray | torch.Tensor, shift: np.ndarray | torch.Tensor) -> tuple[bytes, bytes]:
    """``(beta, shift)`` as float32 bytes for :meth:`IfediclWorkerExtension.ifedicl_write_rows`."""
    as_np = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (beta, shift)]
    return tuple(np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in as_np)
