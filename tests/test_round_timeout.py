"""A stuck client is dropped at the round deadline: real Ray, real LanceDB, a client that never answers.

Its own module because it is deadline-sensitive: the honest clients must answer within a
few-second round timeout, so under `pytest -n 2` it runs while no other test does.
"""

import json

import pytest

from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store

pytestmark = pytest.mark.exclusive


def test_a_stuck_client_is_dropped_at_the_round_timeout_and_the_run_completes(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Client 2 is alive but stuck: it sits 600 s on every calibration request (adversary mode ``hang``).

    Round 1 drops it when the round timeout (a few seconds) runs out, with that reason in the
    round record and the store; round 2 does not ask it again; the run completes and publishes
    with the other two. Loading gets its own, generous timeout: a busy machine loads slowly.
    """
    timeout_s = 6.0
    settings = FederationSettings(
        clients=3, alpha=100.0, rounds=2, min_clients=2, round_timeout_s=timeout_s, load_timeout_s=120,
        min_shard=4, adversaries={2: "hang:600"},
    )  # fmt: skip
    store_dir = tmp_path / "store"
    fed = Federation(str(llama_dir), DataSource(str(task_dir), max_train=30, max_test=0), str(store_dir), settings)
    result = fed.run(publish=True)
    r0, r1, r2 = result.rounds
    assert r0.clients_answered == [0, 1, 2] and not r0.dropped
    assert r1.clients_sampled == [0, 1, 2] and r1.clients_answered == [0, 1]
    assert r1.dropped == {2: "timed out after 6s"}
    assert timeout_s <= r1.seconds < timeout_s + 30  # waited for the deadline, not for the stuck client
    assert r2.clients_sampled == [0, 1] and r2.clients_answered == [0, 1] and not r2.dropped
    store = Store(store_dir)
    assert [json.loads(r["dropped"]) for r in store.rounds(result.run_id)] == [{}, {"2": "timed out after 6s"}, {}]
    assert result.summary["rounds"][1]["answered"] == 2
    assert store.published_run_id(fed.data.task.name) == result.run_id
