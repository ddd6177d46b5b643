"""Flags declared once for the commands that share them; first of all the federation's.

:func:`federation_options` adds one typer option per field of
:class:`~ifedicl.federation_job.options.FederationOptions` to a command and hands the command
the parsed values as one ``federation`` argument, so the three commands cannot drift apart
(they did: ``recalibrate`` lacked the aggregator, secure-aggregation and DP flags).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import typer

from ifedicl.federation_job.options import FederationOptions

HELP = {
    "clients": "number of simulated clients the data set is split over (Dirichlet --alpha)",
    "actors": "Ray actors hosting the clients, each serving its clients one call after another "
    "(default: one per free CPU; --actors N --clients 1000 runs a thousand virtual clients on N processes)",
    "rounds": "federated rounds of stage 2 (Λ); FedAvg-LoRA's rounds in eval",
    "local_epochs": "local epochs per round; a fraction f < 1 trains on the next f of each shard per round",
    "fraction": "fraction of clients sampled per round",
    "min_clients": "a round with fewer answering clients fails the run",
    "round_timeout": "seconds a round waits for clients; one still silent is dropped and recorded",
    "min_shard": "smallest client shard the Dirichlet split may produce",
    "weighted": "weight vector and Λ means by client example counts (paper: unweighted)",
    "weights": "shared (one copy per node) or per-actor model weights",
    "cpus_per_client": "CPUs per client actor (default: the machine's split over the clients)",
    "gpus_per_client": "GPUs per client actor",
    "calib_batch_size": "calibration batch size (I2CL: 2)",
    "objective": "training loss: label-only cross-entropy of the label word against the other label words, or "
    "full-vocab (I2CL's; needs --stage2 local-steps)",
    "prior_correction": "add each client's label log-prior to the label logits in the training loss "
    "(logit adjustment: under label skew a client then learns the balanced classifier, not its own label mix)",
    "stage1": "how the server averages the context vectors: mean (of each client's mean, the paper's) or "
    "class-balanced (each class pooled over all clients, then the classes averaged: I2CL's balance under skew)",
    "stage2": "how each round moves Λ: gauss-newton (clients send the label-only loss's gradient and Gauss-Newton "
    "matrix at the global Λ, the server takes a trust-region step on the pooled objective) or local-steps (clients "
    "calibrate with AdamW, the server averages: the paper's; needed by --objective full-vocab, DP on Λ, robust "
    "aggregators, --server-* and --prior-correction)",
    "holdout_fraction": "early stopping: each client keeps this fraction of its shard out of the rounds and "
    "reports the loss of each round's starting Λ on it; the run stops after --patience rounds without a new best "
    "pooled loss and ends on the best Λ (with --average-rounds: the scored iterate, not that round's mean) (0: off)",
    "patience": "with --holdout-fraction: rounds without a new best pooled held-out loss before the run stops",
    "curvature": "gauss-newton: exact (the whole Jacobian: C-1 backward passes per example), sampled (two, "
    "whatever the classes: the exact gradient and an unbiased Gauss-Newton estimate from one label drawn per "
    "example), empirical (one: the per-example gradients' outer products, biased where the model is wrong) or auto "
    "(exact up to 3 classes, at 3 on a quarter of the rows, empirical from 4)",
    "curvature_memory": "gauss-newton: weight of the past rounds' quadratic models in each step, each re-centred at "
    "the current Λ (0: this round's window alone; 0.5 halves a round's weight every round; default: 0.75 with "
    "a sampled matrix (drawn labels or a fraction of the rows) or the empirical one, whose noise it averages, "
    "else 0)",
    "curvature_fraction": "gauss-newton: the fraction of each round's rows the clients compute the Gauss-Newton "
    "matrix on (every row gives the gradient: one backward pass; the matrix rows C-1 exact or one more sampled), "
    "so a round takes 1 + fraction x (passes - 1) backward passes per example (1: every row; default: 0.25 for "
    "--curvature auto's exact matrix at 3 classes, else 1)",
    "step_check": "gauss-newton: how the trust region measures the last step's decrease: loss (the clients also "
    "evaluate the previous Λ on the round's examples: one more forward pass each) or model (read from the new "
    "statistics: L(Λ - s) ≈ L(Λ) - g·s + ½ sᵀGs, no extra pass)",
    "step_check_fraction": "gauss-newton, --step-check loss: the fraction of each round's rows also scored at the "
    "previous Λ; the decrease is the window's loss plus their paired difference (1: every row)",
    "trust_radius": "gauss-newton: the first round's bound on the step's length ‖ΔΛ‖ (λ starts at 0.1, β at 1); "
    "the trust region doubles it after a step that did what its model predicted and quarters it after one that did not",
    "step_ridge": "gauss-newton: a floor on each step's damping, as a fraction of the pooled Gauss-Newton matrix's "
    "mean eigenvalue: the step minimises g·s + ½ sᵀ(G + μI)s with μ at least this much, so it moves less along the "
    "model's flat directions, where one window's noise decides them. 0: the plain trust-region step",
    "remember_undone": "gauss-newton with a curvature memory: whether the statistics measured at a step that the "
    "next round undid join the memory (they describe a Λ the run went back from; re-centred, a far one's model can "
    "outweigh every other window's)",
    "average_rounds": "each round publishes the mean of the last this many rounds' Λ (what serving reads and the "
    "run ends on) while the round rule keeps stepping from its own; stored with each round, so a recalibration "
    "continues the window. 1: each round's own Λ",
    "step_check_confidence": "gauss-newton, --step-check loss: standard errors of the measured decrease the trust "
    "region needs before it shrinks or undoes a step (the clients also upload the paired differences' variance: "
    "one number); 0: the point estimate decides, as in the classic rule",
    "stage1_examples": "stage 1: each client builds its context vectors from at most this many of its examples "
    "(evenly spaced over its data, so a file sorted by label still gives each class its share); 0: every example. "
    "With --dp-vector-epsilon the noise shrinks as 1/examples: take more there",
    "extract_dtype": "stage-1 autocast dtype",
    "vector_coding": "stage-1 upload of the context vectors on the wire: float16 is half the bytes of float32, "
    "int8 a quarter (one scale per layer and block; the default); the server decodes to float32. "
    "With --secagg only float32 (its default there)",
    "aggregator": "how the server combines vectors and Λ (trimmed-mean and median: coordinate-wise)",
    "trim_fraction": "trimmed-mean: fraction cut from each end",
    "reject_norm_factor": "reject updates with norm > FACTOR x the round's median (vectors; Λ deltas); 0: off",
    "server_optimizer": "the server's step on each round's aggregate Λ, taken as a pseudo-gradient: sgd "
    "(Λ moves --server-lr times the aggregate's change; lr 1 is plain FedAvg), momentum (FedAvgM) or adam (FedAdam)",
    "server_lr": "server learning rate on Λ (sgd, momentum: a multiple of the aggregate's change; adam: about "
    "how far each coefficient moves per round)",
    "server_momentum": "momentum's μ, adam's β1",
    "server_warmup": "rounds over which the server learning rate warms up linearly",
    "server_decay": "server learning rate after warm-up: constant, or cosine down to a tenth at the last round",
    "secagg": "secure aggregation: the server sees only masked sums",
    "secagg_threshold": "secure aggregation: how many clients must stay to recover dropouts' masks, as a fraction "
    "of the cohort (t = the smallest count above it; a higher t tolerates fewer dropouts, resists more collusion)",
    "dp_vector_epsilon": "DP on the uploaded vectors: ε (one release)",
    "dp_vector_clip": "DP: per-example L2 bound of the [L,2,d] contribution",
    "dp_coefficient_epsilon": "DP on Λ updates: ε over all rounds",
    "dp_coefficient_clip": "DP: L2 bound of a client's per-round Λ delta",
    "dp_delta": "DP: δ",
}


def option_set(options: type, help: dict[str, str], panel: str, argument: str):
    """A decorator declaring each field of the dataclass ``options`` as a typer flag (its default, ``help``,
    grouped under ``panel`` in ``--help``) on a command, which receives them parsed as one ``argument``.

    Commands that share a set of flags declare it once with this, instead of repeating the options.
    """
    hints = typing.get_type_hints(options)
    shared = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(f.default, help=help[f.name], rich_help_panel=panel),
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(options)
    ]
    names = [p.name for p in shared]

    def declare(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != argument]

        @functools.wraps(command)
        def with_options(**kwargs):
            chosen = options(**{name: kwargs.pop(name) for name in names})
            return command(**{argument: chosen}, **kwargs)

        with_options.__signature__ = inspect.Signature([*own, *shared])
        with_options.__annotations__ = {p.name: p.annotation for p in [*own, *shared]}
        del with_options.__wrapped__  # typer must read the signature above, not the command's own
        return with_options

    return declare


def revision_option():
    """``--revision``: which revision of a hub ``--model`` (``with_revision`` joins them into one spec)."""
    return typer.Option(
        None, "--revision", help="a hub model's branch, tag or commit; a run records the commit it resolved to, "
        "which serve and predict load unless given another",
    )  # fmt: skip


def model_spec(model: str, revision: str | None) -> str:
    """``--model`` at ``--revision`` as one spec every loader takes (``owner/name@REV``)."""
    from ifedicl.kernel.model_source import with_revision

    return with_revision(model, revision)


def model_for_store(model: str, revision: str | None, store: str) -> str:
    """The spec to serve (or predict with) ``model`` at: ``--revision`` if given; for a hub id without one, the
    commit the store's published runs of it were made at (each records it), so serving loads that revision."""
    from ifedicl.kernel.errors import IfediclError
    from ifedicl.kernel.model_source import is_hub_id
    from ifedicl.storage.store import Store

    if revision is not None or not is_hub_id(model):
        return model_spec(model, revision)
    try:
        runs = Store(store).published_runs().values()
    except Exception:  # noqa: BLE001  no readable store yet: the server reports it, this only picks a revision
        return model
    commits = sorted({info.fingerprint.model_id.removeprefix(f"{model}@") for info in runs
                      if info.fingerprint.model_id.startswith(f"{model}@")})  # fmt: skip
    if len(commits) > 1:
        raise IfediclError(
            f"--revision: the published runs of {model} were made at {len(commits)} commits ({', '.join(commits)}); "
            "pass --revision with the one to serve"
        )
    return model_spec(model, commits[0]) if commits else model


# Declares the federation flags on a command; it receives them as ``federation: FederationOptions``.
federation_options = option_set(FederationOptions, HELP, "Federation", "federation")


@dataclass(frozen=True)
class DataOptions:
    """How a command reads its data, the same way for federate, recalibrate and eval (kernel.sources.DataSource's
    fields of the same names)."""

    text_field: str = "text"
    label_field: str = "label"
    split: str | None = None
    test_split: str | None = None


DATA_HELP = {
    "text_field": "the field (JSONL), column (CSV, Parquet, HF dataset) of the text",
    "label_field": "the field or column of the label (a class index or label word)",
    "split": "the training split: an HF dataset's split or a task directory's file stem (default: train)",
    "test_split": "the held-out split (default: test, else an HF dataset's validation); rows labelled -1 "
    "(unlabelled) are refused",
}
data_options = option_set(DataOptions, DATA_HELP, "Data", "data")
