"""Client compute measured where it happens: inside each client actor, per request, summed per run.

Real local Ray, real actors, real LanceDB.
"""

import json

from compute_checks import check_compute_totals, process_cpu_seconds

from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store


def test_ifedicl_clients_report_their_own_cpu_and_wall_seconds(ray_session, llama_dir, task_dir, tmp_path):
    process_cpu = {}

    def read_actor_cpu(stage, round_index, results, actors):
        if stage == "calibrate" and round_index == 2:  # the last request each client serves
            process_cpu.update({cid: process_cpu_seconds(actor) for cid, actor in actors.items()})

    settings = FederationSettings(clients=2, alpha=1.0, rounds=2, min_clients=1, round_timeout_s=120, min_shard=4)
    store_dir = tmp_path / "store"
    fed = Federation(
        str(llama_dir), DataSource(str(task_dir), max_test=0), str(store_dir), settings, None, read_actor_cpu
    )
    result = fed.run()
    summary = result.summary
    check_compute_totals(summary, {"extract", "calibrate"}, {0, 1})
    assert [sorted(r["client_seconds"]) for r in summary["rounds"]] == [["extract"], ["calibrate"], ["calibrate"]]
    for cid, cpu in process_cpu.items():
        # measured inside the actor's process: never more CPU than that process has used in all (1 tick of slack)
        assert summary["client_seconds_per_client"][str(cid)]["cpu"] <= cpu + 0.02
    stored = json.loads(Store(store_dir).run_row(result.run_id)["summary"])
    assert stored["client_cpu_seconds"] == summary["client_cpu_seconds"]
    assert json.loads(Store(store_dir).run_row(result.run_id)["settings"])["method"] == "ifedicl"
