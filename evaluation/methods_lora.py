"""FedAvg-LoRA: the conventional federated fine-tuning baseline, on the same Ray job as IFed-ICL.

The run is a :class:`~ifedicl.federation_job.lora_federation.LoraFederation`: the same client
actors, split, rounds, local epochs, client sampling, drop handling and FedAvg as
IFed-ICL, with peft LoRA (rank 8 by default) on the attention query/value projections
trained locally instead of Λ (:mod:`ifedicl.federation_job.lora`). Same forward, same AdamW
schedule, and the objective ``settings.objective_for("fedavg_lora")`` (label-only
cross-entropy unless ``--objective`` says otherwise).

Bytes are measured, not computed: every upload/download is the adapters' state dict
encoded with :func:`ifedicl.federation_job.wire.encode` at the Ray boundary, and ``len()`` of
those bytes is counted by the driver. Framing = 8-byte length + safetensors JSON header
(tensor names, dtypes, shapes, offsets, metadata: example count, loss, compute seconds);
the rest is exactly the trainable parameters' bytes. Client time is what each actor
measured (:func:`.context.federated_compute`), as for IFed-ICL.
"""

from __future__ import annotations

from ifedicl.evaluation.context import MethodContext, federated_cell, federation_settings
from ifedicl.evaluation.scoring import score
from ifedicl.evaluation.settings import Cell, scored_rounds
from ifedicl.evaluation.tasks import PreparedTask
from ifedicl.federation_job.lora import LoraSettings, attach_lora, load_trainable, target_modules, trainable_bytes
from ifedicl.kernel.modeling import load_model
from ifedicl.model_patches.hf import HFContextModel


def fedavg_lora(mc: MethodContext, task: PreparedTask, cell: Cell) -> dict:
    """The Ray FedAvg-LoRA run, then accuracy of the global adapters after every scored round (round 0 = base
    model)."""
    from ifedicl.federation_job.lora_federation import LoraFederation

    s = mc.settings
    objective = s.objective_for(cell.method)
    lora = LoraSettings(rank=s.lora_rank, alpha=s.lora_alpha, lr=s.lora_lr, init_seed=cell.seed)
    settings = federation_settings(mc, cell)
    fed = LoraFederation(mc.model_id, task.source, mc.store_uri, settings, lora=lora)
    result = fed.run()

    # Scoring in this process: a fresh base (peft edits modules in place, so never the shared model).
    base = load_model(mc.model_id, s.dtype)
    ctx = HFContextModel(base)
    try:
        model = attach_lora(base, lora)
        per_round = []
        for r in scored_rounds(list(range(len(fed.states))), s.scored_rounds):
            load_trainable(model, fed.states[r])
            scored = score(ctx, mc.tokenizer, task.spec, task.test, batch_size=s.batch_size)
            per_round.append({"round": r, **scored, **({"mean_loss": result.rounds[r].mean_loss} if r else {})})
        param_bytes = trainable_bytes(model)
    finally:
        ctx.remove_hooks()
    uploads = [b for rec in result.rounds[1:] for b in rec.bytes_up]
    return {
        **federated_cell(result, per_round, objective),
        "lora": {
            "rank": s.lora_rank,
            "alpha": s.lora_alpha,
            "target_modules": target_modules(base),
            "trainable_parameters": sum(v.size for v in fed.states[0].values()),
            "trainable_bytes": param_bytes,
            # the JSON header varies by a few bytes with the metadata's numbers (loss, compute seconds)
            "upload_framing_bytes": [min(uploads) - param_bytes, max(uploads) - param_bytes],
        },
    }
