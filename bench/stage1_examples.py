"""How far the pooled stage-1 vectors move when each client extracts from fewer of its examples.

Stage 1 is a fixed client cost every run pays first (a forward per example of the shard), about a fifth of a
client's CPU by the round where IFed-ICL passes FedAvg-LoRA on AG News; I2CL builds its vectors from 5
demonstrations per class. This bench draws ``--clients`` × k demonstrations from the task's training examples
(blocks of ``--block``, without replacement, ``--draws`` times) and prints the pooled mean's relative distance
to the mean over all of them, per layer and block, ‖v_k − v_all‖ / ‖v_all‖: the mean over layers and the
worst layer. It says how much the vectors change, not what that does to the accuracy (the ablation's
``stage 1: 16 examples per client`` variant measures that). Prints figures, asserts nothing.

    python bench/stage1_examples.py --task ../shared/data/agnews --examples 600
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import capture_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="../shared/data/agnews", help="a task directory (ifedicl's data format)")
    parser.add_argument("--examples", type=int, default=600, help="training examples pooled (the report's 600)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", default="8,16,24,32", help="comma-separated k to try")
    parser.add_argument("--block", type=int, default=8, help="demonstrations per forward batch and per draw")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_task_dir(args.task)
    train = data.train.head(args.examples)
    ctx = HFContextModel(load_model(args.model, "float32"))
    tokenizer = load_tokenizer(args.model)
    demos = [data.task.demonstration(t, y) for t, y in zip(train.texts, train.labels)]
    draws = np.random.default_rng(0)
    order = draws.permutation(len(demos))
    blocks = [order[s : s + args.block] for s in range(0, len(order) - args.block + 1, args.block)]
    sums = torch.stack(
        [capture_sum(ctx, tokenizer, [demos[i] for i in b], args.block).double() for b in blocks]
    )  # [blocks, L, 2, d]: each block's sum
    pooled = sums.sum(0) / (len(blocks) * args.block)  # [L, 2, d]
    total = len(blocks) * args.block
    print(f"{args.model} on {data.task.name}: {total} demonstrations, {args.clients} clients, {args.draws} draws; "
          "relative distance of the pooled mean to all examples' (per layer and block)")  # fmt: skip
    print(f"{'per client':>10} {'pooled':>7} {'mean':>7} {'worst layer':>12}")
    for k in (int(v) for v in args.per_client.split(",")):
        picked = max(1, k * args.clients // args.block)
        if picked > len(blocks):
            print(f"{k:>10} needs {picked * args.block} examples: skipped")
            continue
        distances = []
        for _ in range(args.draws):
            chosen = sums[draws.choice(len(blocks), size=picked, replace=False)]
            part = chosen.sum(0) / (picked * args.block)  # [L, 2, d]
            distances.append((part - pooled).norm(dim=-1) / pooled.norm(dim=-1))  # [L, 2]
        mean = torch.stack(distances).mean(0)  # [L, 2]
        print(f"{k:>10} {picked * args.block:>7} {float(mean.mean()):>7.4f} {float(mean.max()):>12.4f}")


if __name__ == "__main__":
    main()
