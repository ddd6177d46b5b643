"""What every method gets: the settings, the frozen model (loaded once), where to write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ifedicl.evaluation.settings import EvalSettings
from ifedicl.model_patches.hf import HFContextModel


@dataclass
class MethodContext:
    settings: EvalSettings
    model_id: str
    model: object  # the frozen HF causal LM, shared by the in-process methods
    ctx: HFContextModel
    tokenizer: object
    out_dir: Path
    inference: tuple | None = None  # (ctx, tokenizer) of the prompt-only methods, when their dtype differs

    def prompt_only(self) -> tuple:
        """(ctx, tokenizer) the prompt-only methods score with: ``settings.inference_dtype`` if set."""
        dtype = self.settings.inference_dtype
        if dtype is None or dtype == self.settings.dtype:
            return self.ctx, self.tokenizer
        if self.inference is None:
            from ifedicl.kernel.modeling import load_model

            self.inference = (HFContextModel(load_model(self.model_id, dtype)), self.tokenizer)
        return self.inference

    @property
    def store_uri(self) -> str:
        """LanceDB store the Ray federation writes Λ per round into (read back for per-round accuracy)."""
        return str(self.out_dir / "federation_store")


def federated_comm(rounds) -> dict:
    """Bytes as the driver measured them at the Ray boundary (len of each payload); round 0 = stage 1."""
    stage1, stage2 = rounds[0], [r for r in rounds if r.round > 0]
    return {
        "stage1_up_per_client": float(np.mean(stage1.bytes_up)) if stage1.bytes_up else 0.0,
        "stage1_down_per_client": float(np.mean(stage1.bytes_down)) if stage1.bytes_down else 0.0,
        "round_up_per_client": float(np.mean([b for r in stage2 for b in r.bytes_up])),
        "round_down_per_client": float(np.mean([b for r in stage2 for b in r.bytes_down])),
        "total_up": int(sum(sum(r.bytes_up) for r in rounds)),
        "total_down": int(sum(sum(r.bytes_down) for r in rounds)),
    }


COMPUTE_FIELDS = ("client_cpu_seconds", "client_wall_seconds", "client_seconds_by_stage", "client_seconds_per_client")


def federated_compute(summary: dict) -> dict:
    """Client time of a Ray federation as the clients measured it (mean per client, all its requests)."""
    per_client = summary["client_seconds_per_client"]
    return {
        "client_seconds": float(np.mean([c["wall"] for c in per_client.values()])),
        "client_cpu_seconds": float(np.mean([c["cpu"] for c in per_client.values()])),
        "client_seconds_note": "measured inside each client actor (wall and process CPU seconds per request), "
        "summed over its requests, mean over clients",
        "client_compute": {k: summary[k] for k in COMPUTE_FIELDS},
    }


def client_cpu_through_round(summary: dict) -> dict[int, float]:
    """{round: the client CPU seconds spent up to and including it, mean per client}: what a run stopped after
    that round would have cost its clients (the last round's value is the cell's ``client_cpu_seconds``)."""
    clients = max(1, len(summary["client_seconds_per_client"]))
    spent, through = 0.0, {}
    for record in sorted(summary["rounds"], key=lambda r: r["round"]):
        by_stage = record["client_seconds"].values()
        spent += sum(report["cpu_s"] for by_client in by_stage for report in by_client.values()) / clients
        through[record["round"]] = round(spent, 4)
    return through


def federated_cell(result, per_round: list[dict], objective: str) -> dict:
    """What a federated method's cell records (IFed-ICL and FedAvg-LoRA alike, so they compare): the final and
    per-round accuracy with the client CPU seconds spent so far, the run, client compute, the driver's stage
    seconds, drops and bytes."""
    final = per_round[-1]
    spent = client_cpu_through_round(result.summary)
    return {
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "per_round": [{**p, "client_cpu_seconds": spent.get(p["round"])} for p in per_round],
        "run_id": result.run_id,
        "objective": objective,
        **federated_compute(result.summary),
        "stage_seconds": float(sum(r.seconds for r in result.rounds)),  # the driver's wall time of the Ray stages
        "dropped": {r.round: r.dropped for r in result.rounds if r.dropped},
        "comm": federated_comm(result.rounds),
    }


def no_communication() -> dict:
    """Centralized / local methods exchange nothing."""
    return {
        "stage1_up_per_client": 0,
        "stage1_down_per_client": 0,
        "round_up_per_client": 0,
        "round_down_per_client": 0,
        "total_up": 0,
        "total_down": 0,
    }


def federation_settings(mc: MethodContext, cell):
    """The Ray federation a cell's federated methods (IFed-ICL, FedAvg-LoRA) run: same clients, shards,
    rounds, local epochs, weighting, objective, recipe and federation flags, so their bytes and seconds
    compare. Built by the same :class:`FederationOptions` as ``ifedicl federate``'s."""
    from ifedicl.federation_job.options import FederationOptions

    s = mc.settings
    options = FederationOptions(
        clients=s.clients,
        rounds=s.rounds,
        local_epochs=s.local_epochs,
        min_shard=s.min_shard,
        weighted=s.weighted,
        **s.federation,
    )
    return options.settings(
        cell.alpha,
        cell.seed,
        dtype=s.dtype,
        # the ablation's recipe key (its cells' hashes name it there) stands over the option
        **{k: v for k, v in s.recipe.items() if k == "stage1_examples"},
        calibration=s.calibration(cell.method),
    )

