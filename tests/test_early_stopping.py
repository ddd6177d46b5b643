"""Early stopping on the clients' held-out loss (``--holdout-fraction``, ``--patience``): the split each client
keeps, the stopping rule, the checks on what clients report, and a real second-order federation (Ray, LanceDB,
a tiny model) that records the held-out losses and, if it stops, ends on the best Λ."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ifedicl.federation_job import wire
from ifedicl.federation_job.early_stopping import EarlyStopping, holdout_rows, pooled_holdout_loss
from ifedicl.federation_job.options import FederationOptions
from ifedicl.federation_job.strategies import ClientUpdate
from ifedicl.federation_job.tail_average import ITERATES
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store


def test_a_client_holds_out_the_same_rows_every_round_and_trains_on_the_rest():
    train, held = holdout_rows(10, 0.2, seed=7)
    assert (train, held) == holdout_rows(10, 0.2, seed=7)  # the same split in every round of the run
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    assert holdout_rows(10, 0.2, seed=8) != (train, held)  # another client (or run): another split
    assert [len(h) for _, h in (holdout_rows(2, 0.01, 0), holdout_rows(2, 0.99, 0))] == [1, 1]  # one row each side
    with pytest.raises(ValueError, match="at least 2"):
        holdout_rows(1, 0.5, 0)


def test_the_run_stops_after_patience_rounds_without_a_new_best_and_knows_the_best():
    rule = EarlyStopping(patience=2)
    for round_index, loss in enumerate([0.9, 0.7, None, 0.75, 0.6, 0.65]):
        rule.observe(round_index, loss)  # None: no client reported (not counted)
        assert not rule.stop
    assert rule.best_round == 4
    rule.observe(6, 0.61)
    assert rule.stop and rule.best_round == 4
    assert rule.summary(stopped_at=7) == {
        "holdout_loss_by_round": {"0": 0.9, "1": 0.7, "3": 0.75, "4": 0.6, "5": 0.65, "6": 0.61},
        "best_round": 4,
        "stopped_at_round": 7,
    }


def test_held_out_losses_pool_by_their_counts_and_malformed_reports_are_refused():
    updates = [
        ClientUpdate(0, np.zeros(1), 5, 0.5, holdout=(3, 1.0)),
        ClientUpdate(1, np.zeros(1), 5, 0.5, holdout=(1, 3.0)),
        ClientUpdate(2, np.zeros(1), 5, 0.5),
    ]
    assert pooled_holdout_loss(updates) == pytest.approx(1.5)
    assert pooled_holdout_loss(updates[2:]) is None
    assert wire.holdout_facts({"num_examples": 3}) is None
    assert wire.holdout_facts({"holdout_loss": 0.4, "holdout_examples": 2}) == (2, 0.4)
    for bad in ({"holdout_loss": float("nan"), "holdout_examples": 2}, {"holdout_loss": -1.0, "holdout_examples": 2},
                {"holdout_loss": 0.4, "holdout_examples": 0}, {"holdout_loss": 0.4, "holdout_examples": True},
                {"holdout_loss": 0.4}):  # fmt: skip
        with pytest.raises(FederationError, match="client 3 reported holdout_"):
            wire.holdout_facts(bad, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"holdout_fraction": 1.0}, "--holdout-fraction must be in"),
        ({"holdout_fraction": 0.2, "patience": 0}, "--patience must be >= 1"),
        ({"holdout_fraction": 0.2, "stage2": "local-steps"}, "goes with --stage2 gauss-newton"),
        ({"holdout_fraction": 0.2, "dp_vector_epsilon": 1.0}, "no DP noise model"),
    ],
)
def test_early_stopping_settings_that_cannot_work_name_their_flag(fields, message):
    with pytest.raises(IfediclError, match=message):
        FederationOptions(**fields).settings(0.5, 0).validate()


def test_a_federation_records_the_held_out_losses_and_ends_on_the_best_lambda(
    ray_session, llama_dir, task_dir, tmp_path
):
    from ifedicl.federation_job.driver import Federation

    settings = FederationOptions(
        clients=2, rounds=6, local_epochs=0.5, min_shard=4, actors=1, holdout_fraction=0.25, patience=1
    ).settings(1.0, 0)
    source = DataSource(str(task_dir), max_train=32, max_test=8)
    result = Federation(str(llama_dir), source, str(tmp_path / "store"), settings).run()
    seen = result.summary["early_stopping"]
    stopped_at, best = seen["stopped_at_round"], seen["best_round"]
    last = stopped_at if stopped_at is not None else settings.rounds
    assert [r.round for r in result.rounds] == list(range(last + 1))
    # every round scored the Λ it started from on the clients' held-out rows
    assert sorted(int(r) for r in seen["holdout_loss_by_round"]) == list(range(last))
    assert all(loss > 0 for loss in seen["holdout_loss_by_round"].values())
    losses = {int(r): loss for r, loss in seen["holdout_loss_by_round"].items()}
    assert best == min(losses, key=losses.get)
    by_round = Store(tmp_path / "store").coefficients_by_round(result.run_id)
    if stopped_at is not None:  # the stopping round records the best Λ as its own: the run ends (and serves) it
        assert np.array_equal(by_round[stopped_at], by_round[best]) and stopped_at - best > 1
        assert np.array_equal(result.coefficients, by_round[best])
        states = Store(tmp_path / "store").server_states(result.run_id)  # and the best round's trust region
        assert max(states) == stopped_at
        if best > 0:
            for name in ("radius", "accepted", "predicted"):
                np.testing.assert_array_equal(states[stopped_at][name], states[best][name])
        else:  # the initial Λ: a trust region that has not stepped (no step to measure)
            assert "accepted" not in states[stopped_at] and states[stopped_at]["radius"] == [settings.trust_radius]
    else:
        assert np.array_equal(result.coefficients, by_round[settings.rounds])
    # the held-out rows stay out of stage 1 too: the same clients and shards without a held-out split make
    # other context vectors
    whole = dataclasses.replace(settings, holdout_fraction=0.0, rounds=1)
    unsplit = Federation(str(llama_dir), source, str(tmp_path / "unsplit"), whole).run()
    assert unsplit.vectors.shape == result.vectors.shape and not np.allclose(unsplit.vectors, result.vectors)


def test_an_averaging_run_that_stops_ends_on_the_scored_iterate_not_the_mean(ray_session, llama_dir, task_dir,
                                                                              tmp_path):  # fmt: skip
    """With --average-rounds a round starts from, and the clients score, the rule's iterate; the published mean's
    held-out loss is never measured, so stopping ends on the best round's iterate: the Λ the plain run (same seed,
    same trajectory, same losses) stops on too."""
    from ifedicl.federation_job.driver import Federation

    source = DataSource(str(task_dir), max_train=32, max_test=8)
    settings = FederationOptions(
        clients=2, rounds=6, local_epochs=0.5, min_shard=4, actors=1, holdout_fraction=0.25, patience=1
    ).settings(1.0, 0)
    plain = Federation(str(llama_dir), source, str(tmp_path / "plain"), settings).run()
    averaged_settings = dataclasses.replace(settings, average_rounds=2)
    averaged = Federation(str(llama_dir), source, str(tmp_path / "store"), averaged_settings).run()
    seen = averaged.summary["early_stopping"]
    plain_seen = plain.summary["early_stopping"]
    assert seen["stopped_at_round"] is not None
    assert (seen["best_round"], seen["stopped_at_round"]) == (plain_seen["best_round"], plain_seen["stopped_at_round"])
    assert seen["holdout_loss_by_round"] == pytest.approx(plain_seen["holdout_loss_by_round"], rel=1e-5)
    np.testing.assert_allclose(averaged.coefficients, plain.coefficients, atol=1e-5)
    store = Store(tmp_path / "store")
    best = seen["best_round"]
    iterate = store.server_state(averaged.run_id, best)[1][ITERATES][-1]  # round best's own: the window's newest
    np.testing.assert_allclose(averaged.coefficients, iterate, atol=1e-6)
    assert best >= 2  # (this seed's) from round 2 on a round's published mean is not its iterate
    assert not np.allclose(store.coefficients_by_round(averaged.run_id)[best], iterate, atol=1e-4)
    # the stopping round stores the best round's server state: a warm start measures the step that made that Λ
    states = store.server_states(averaged.run_id)
    assert max(states) == seen["stopped_at_round"]
    assert {name: value.tolist() for name, value in states[max(states)].items()} == {
        name: value.tolist() for name, value in states[best].items()
    }


def test_stage_one_of_some_rows_is_stage_one_of_a_client_holding_only_those(llama_dir, task_dir):
    from ifedicl.federation_job.client import Client
    from ifedicl.kernel.data import load_task_dir
    from ifedicl.kernel.modeling import load_model, load_tokenizer
    from ifedicl.model_patches.hf import HFContextModel

    data = load_task_dir(task_dir)
    ctx, tokenizer = HFContextModel(load_model(str(llama_dir))), load_tokenizer(str(llama_dir))
    shard = data.train.head(6)
    rows = [0, 2, 3, 5]
    subset = shard.subset(rows)
    whole, alone = Client(ctx, tokenizer, data.task, shard), Client(ctx, tokenizer, data.task, subset)
    np.testing.assert_allclose(whole.extract_vectors(rows=rows), alone.extract_vectors(), rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(whole.extract_class_means(rows=rows), alone.extract_class_means(), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
