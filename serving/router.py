"""``model="auto"``: send each text to the served task whose context vectors it is nearest to.

The query side of :mod:`ifedicl.storage.routing_index`. A text's signature is read in the space
the context vectors live in: the same frozen model, the same blocks (attention and
MLP outputs), at the token that ends the text (``text + "\\n"``, as a stage-1
demonstration ends with a newline). The forward is a plain one (nothing injected),
batched on the HF path beside the engine: it needs block outputs, which vLLM's
sampler never returns. That costs one more copy of the weights in the server
process, which is why routing is opt-in (``ifedicl serve --auto-route``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import encode
from ifedicl.storage.routing_index import Route, TaskSignatureIndex, signature_layers

BATCH_SIZE = 16


def query_text(text: str) -> str:
    """What the signature forward reads: the text ending like a demonstration does."""
    return f"{text}\n"


class TaskRouter:
    """Routes texts to tasks: HF forward for the query, LanceDB search for the nearest task."""

    def __init__(self, model: str, dtype: str, index_dir: str | Path):
        self.tokenizer = load_tokenizer(model)
        self.ctx = HFContextModel(load_model(model, dtype))
        self.index = TaskSignatureIndex(index_dir, signature_layers(self.ctx.num_layers))
        self._forward_lock = threading.Lock()  # one forward at a time (called from worker threads)

    def rebuild(self, runs: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Index ``(task, run_id, vectors [L, 2, d])`` of every served run."""
        self.index.rebuild(runs)

    @torch.no_grad()
    def activations(self, texts: Sequence[str]) -> np.ndarray:
        """Block outputs at each text's last token: ``[N, L, 2, d]`` float32 (plain model)."""
        out = []
        with self._forward_lock:
            for start in range(0, len(texts), BATCH_SIZE):
                batch = [query_text(t) for t in texts[start : start + BATCH_SIZE]]
                input_ids, mask = encode(self.tokenizer, batch)
                with self.ctx.capturing(mask) as captured:
                    self.ctx.forward(input_ids, mask)
                stacked = torch.stack([torch.stack(pair) for pair in captured]).float()  # [L, 2, B, d]
                out.append(stacked.permute(2, 0, 1, 3).numpy())  # [B, L, 2, d]
        return np.concatenate(out)

    def route(self, texts: Sequence[str]) -> list[Route]:
        """The nearest served task of each text (blocking: call it from a worker thread)."""
        return self.index.nearest(self.activations(texts))
