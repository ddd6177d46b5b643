"""What every method gets: the settings, the frozen model (loaded once), where to write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation_job.evaluation.settings import EvalSettings
from model_patches.hf import HFContextModel


@dataclass
class MethodContext:
    settings: EvalSettings
    model_id: str
    model: object  # the frozen HF causal LM, shared by the in-process methods
    ctx: HFContextModel
    tokenizer: object
    out_dir: Path

    @property
    def store_uri(self) -> str:
        """LanceDB store the Ray federation writes Λ per round into (read back for per-round accuracy)."""
        return str(self.out_dir / "federation_store")


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
