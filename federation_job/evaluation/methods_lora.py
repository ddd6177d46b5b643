"""FedAvg-LoRA: the conventional federated fine-tuning baseline, with measured bytes.

peft LoRA (rank 8 by default) on the attention query/value projections (``q_proj``,
``v_proj``; GPT-2's fused ``c_attn``), same clients, split, rounds and local epochs as
IFed-ICL, same objective (cross-entropy over the label words' first-token logits at
the last prompt position), same AdamW schedule. The server averages the LoRA weights.

Bytes are measured, not computed: every upload/download is the LoRA trainable state
dict encoded with :func:`federation_job.wire.encode` (the format IFed-ICL uses at its
Ray boundary), and ``len()`` of those bytes is counted. Framing = 8-byte length +
safetensors JSON header (tensor names, dtypes, shapes, offsets, metadata); the rest
is exactly the trainable parameters' bytes.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from federation_job import wire
from federation_job.client import CalibrationConfig, warmup_cosine
from federation_job.data import Split
from federation_job.evaluation import metrics
from federation_job.evaluation.context import MethodContext
from federation_job.evaluation.settings import Cell
from federation_job.evaluation.tasks import PreparedTask
from federation_job.inference import encode
from federation_job.modeling import load_model
from federation_job.server import ClientUpdate, FedAvg
from federation_job.task import label_token_ids
from model_patches.hf import last_token_index, position_ids_from_mask


def target_modules(model) -> list[str]:
    """Query/value projections: separate in Llama/Qwen/Mistral, fused ``c_attn`` in GPT-2."""
    return ["c_attn"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj"]


def build_lora_model(model_id: str, rank: int, alpha: int, seed: int, dtype: str = "float32"):
    """A fresh frozen base with LoRA adapters (peft edits modules in place, so never the shared model)."""
    from peft import LoraConfig, get_peft_model

    base = load_model(model_id, dtype)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules(base),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=base.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(base, config)


def trainable_state(model) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.from_numpy(state[name]))


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def framing_bytes(payload: bytes) -> int:
    """Non-parameter bytes of a wire payload: the 8-byte header length plus the JSON header."""
    return 8 + int.from_bytes(payload[:8], "little")


def label_logits(model, tokenizer, prompts: list[str], label_ids: list[int]) -> torch.Tensor:
    """Label-word logits [B, C] at each prompt's last real token (right-padded batch)."""
    device = next(model.parameters()).device
    input_ids, mask = encode(tokenizer, prompts, device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    last = logits[torch.arange(len(prompts), device=device), last_token_index(mask)]
    return last[:, torch.as_tensor(label_ids, device=device)].float()


@torch.no_grad()
def evaluate(model, tokenizer, task, test: Split, batch_size: int) -> dict[str, float]:
    model.eval()
    label_ids = label_token_ids(task, tokenizer)
    predictions = []
    for start in range(0, len(test), batch_size):
        prompts = [task.prompt(t) for t in test.texts[start : start + batch_size]]
        predictions += label_logits(model, tokenizer, prompts, label_ids).argmax(dim=1).tolist()
    return {
        "accuracy": metrics.accuracy(predictions, test.labels),
        "macro_f1": metrics.macro_f1(predictions, test.labels, len(task.labels)),
    }


def train_local(model, tokenizer, task, data: Split, epochs: int, lr: float, seed: int) -> float:
    """Local LoRA training on one client's shard with I2CL's optimizer schedule; returns mean loss."""
    config = CalibrationConfig(lr=lr, epochs=epochs)
    model.train()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = math.ceil(len(data) / config.batch_size) * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, config.warmup_fraction, config.lr, config.min_lr)
    )
    label_ids = label_token_ids(task, tokenizer)
    losses = []
    for _ in range(epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            logits = label_logits(model, tokenizer, [task.prompt(data.texts[i]) for i in rows], label_ids)
            target = torch.as_tensor([data.labels[i] for i in rows], device=logits.device)
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    model.eval()
    return float(np.mean(losses))


def fedavg_lora(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    s = mc.settings
    model = build_lora_model(mc.model_id, s.lora_rank, s.lora_alpha, cell.seed, s.dtype)
    shards = task.shards(s.clients, cell.alpha, cell.seed, s.min_shard)
    server = FedAvg(s.weighted)
    global_state = trainable_state(model)
    param_bytes = trainable_bytes(model)
    per_round = [{"round": 0, **evaluate(model, mc.tokenizer, task.spec, task.test, s.batch_size)}]
    seconds = [0.0] * len(shards)
    ups, downs, framing = [], [], []
    for r in range(1, s.rounds + 1):
        download = wire.encode(global_state, round=r)
        uploads: dict[int, bytes] = {}
        losses = []
        for cid, shard in enumerate(shards):
            start = time.monotonic()
            state, _ = wire.decode(download)  # the client starts from exactly what it received
            load_trainable(model, state)
            losses.append(
                train_local(
                    model, mc.tokenizer, task.spec, shard, s.local_epochs, s.lora_lr, cell.seed * 1000 + r * 100 + cid
                )
            )
            uploads[cid] = wire.encode(trainable_state(model), num_examples=len(shard))
            seconds[cid] += time.monotonic() - start
            downs.append(len(download))
        ups += [len(p) for p in uploads.values()]
        framing += [framing_bytes(p) for p in uploads.values()]
        decoded = {cid: wire.decode(p) for cid, p in uploads.items()}
        global_state = {
            name: server.aggregate(
                [ClientUpdate(cid, arrays[name], int(meta["num_examples"])) for cid, (arrays, meta) in decoded.items()]
            )
            for name in global_state
        }
        load_trainable(model, global_state)
        per_round.append(
            {
                "round": r,
                "mean_loss": float(np.mean(losses)),
                **evaluate(model, mc.tokenizer, task.spec, task.test, s.batch_size),
            }
        )
    final = per_round[-1]
    return {
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "per_round": per_round,
        "client_seconds": float(np.mean(seconds)),
        "client_seconds_note": "mean per client of its local training time over all rounds (in-process, sequential)",
        "lora": {
            "rank": s.lora_rank,
            "alpha": s.lora_alpha,
            "target_modules": target_modules(model.get_base_model()),
            "trainable_parameters": sum(p.size for p in global_state.values()),
            "trainable_bytes": param_bytes,
            "upload_framing_bytes": max(framing),
        },
        "comm": {
            "stage1_up_per_client": 0,
            "stage1_down_per_client": 0,
            "round_up_per_client": float(np.mean(ups)),
            "round_down_per_client": float(np.mean(downs)),
            "total_up": int(sum(ups)),
            "total_down": int(sum(downs)),
        },
    }
