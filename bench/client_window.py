"""One client on a window of real training examples, at the initial Λ: what the per-round benches measure on.

Shared by ``client_rounds.py`` and ``zeroth_order.py`` (run as scripts from the repository root, so this
folder is on ``sys.path``): the same flags, model, window and context vectors for every figure they print.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from ifedicl.federation_job.client import Client
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.kernel.task import TaskSpec
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.injection import initial_coefficients


def add_window_flags(parser: argparse.ArgumentParser, examples: int) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="../shared/data/subj", help="a task directory (ifedicl's data format)")
    parser.add_argument("--examples", type=int, default=examples, help="a round's window of one client")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (the driver's batch)")


@dataclass
class ClientWindow:
    task: TaskSpec
    client: Client
    rows: list[int]  # the window's example indices
    vectors: np.ndarray  # [L, 2, d] float32, this window's context vectors
    start: np.ndarray  # [L, 2, 2] float32, the initial Λ

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> ClientWindow:
        torch.set_num_threads(args.threads)
        data = load_task_dir(args.task)
        window = data.train.head(args.examples)
        ctx = HFContextModel(load_model(args.model, "float32"))
        client = Client(ctx, load_tokenizer(args.model), data.task, window)
        vectors = np.asarray(client.extract_vectors(batch_size=args.batch_size), dtype=np.float32)
        return cls(data.task, client, list(range(len(window))), vectors, initial_coefficients(ctx.num_layers).numpy())
