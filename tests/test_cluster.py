"""The cluster path, run for real: `ray job submit` to a live head, and a federation over two Ray nodes.

The commands are the README's ("On an existing Ray cluster"): `ray get-auth-token --generate`,
`RAY_AUTH_MODE=token`, `ray start --head --dashboard-host 127.0.0.1`, `ray job submit`, plus what keeps
this cluster apart from any other Ray on the machine (tests/ray_nodes.py: its own temp dir and HOME,
its own free ports). Every Ray process is stopped by the fixture's finalizer, pass or fail, never by
`ray stop`. Ray advertises the host's own address for its nodes (it never advertises loopback, even
when told 127.0.0.1); the job server listens on 127.0.0.1 and nothing leaves the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ifedicl.kernel.data import load_task_dir
from ifedicl.storage.recalibrations import attempts
from ifedicl.storage.store import Store
from ifedicl.storage.store_metrics import RecalibrationCollector

sys.path.insert(0, str(Path(__file__).parent))
from ray_nodes import RAY, LocalRayCluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]  # under FAST_HEALTH_CHECKS a node missing 1 s checks is dead

DRIVER = Path(__file__).with_name("cluster_federation.py")
AUDITED = Path(__file__).with_name("audited_driver.py")
# Node death is noticed by the GCS health checks (Ray's defaults take ~30 s); a killed node's clients
# would be dropped anyway, later. Faster checks keep the test short.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@pytest.fixture
def cluster():
    """A token-authenticated local Ray cluster (nodes added by the test); always stopped."""
    made = LocalRayCluster()
    try:
        made.generate_token()  # README: `ray get-auth-token --generate`, here under the cluster's own HOME
        yield made
    finally:
        made.stop()


def _run(args: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def _job_status(cluster: LocalRayCluster, job_id: str) -> str:
    """The job's status from the job server's REST API (what `ray job status` reads), with the token."""
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def _job_logs(cluster: LocalRayCluster, job_id: str) -> str:
    proc = _run([RAY, "job", "logs", "--address", cluster.dashboard_url, job_id], cluster.env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _events(log: str, event: str) -> list[dict]:
    """The driver's structured log lines of one kind (progress bars may share their terminal line)."""
    marker = f'{{"event": "{event}"'
    return [json.loads(line[line.index(marker) :]) for line in log.splitlines() if marker in line]


def test_federate_then_recalibrate_submitted_with_ray_job_submit(cluster, llama_dir, task_dir, tmp_path):
    started = time.monotonic()
    cluster.start_head(num_cpus=2)
    store = tmp_path / "store"
    submit = [RAY, "job", "submit", "--address", cluster.dashboard_url]
    common = ["--model", llama_dir, "--store", store, "--task-dir", task_dir, "--clients", 2, "--rounds", 1]
    common += ["--min-clients", 2, "--max-test", 10]

    # Without RAY_AUTH_MODE=token the client sends no token: refused, and told why.
    no_token_env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    refused = _run([*submit, "--", "true"], no_token_env, timeout=60)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr

    # federate: the token comes from ~/.ray/auth_token (RAY_AUTH_MODE=token set), as the README says.
    fed = _run([*submit, "--submission-id", "ifedicl-federate", "--", "ifedicl", "federate", *common, "--publish"],
               cluster.env)  # fmt: skip
    assert fed.returncode == 0, fed.stdout[-3000:] + fed.stderr[-3000:]
    assert "Job 'ifedicl-federate' succeeded" in fed.stdout + fed.stderr
    assert _job_status(cluster, "ifedicl-federate") == "SUCCEEDED"
    log = _job_logs(cluster, "ifedicl-federate")
    (finished,) = _events(log, "run_finished")
    assert finished["published"] is True
    assert [r["answered"] for r in _events(log, "round")] == [2, 2]
    stored = Store(store)
    (run,) = stored.runs()
    assert run["run_id"] == finished["run"] and run["status"] == "complete"
    task = run["task"]
    assert stored.published_run_id(task) == run["run_id"]
    assert len(stored.load_run(task).coefficients) == 2  # L=2 layers of Λ, loadable

    # recalibrate: a client with no token file, the token in RAY_AUTH_TOKEN. A margin of -1 demands an
    # impossible gain, so the guardrail keeps the live run: with --kept-live-ok that is a SUCCEEDED job.
    env = {**cluster.env, "HOME": str(tmp_path / "no-token-here"), "RAY_AUTH_TOKEN": cluster.token}
    rec = _run([*submit, "--submission-id", "ifedicl-recalibrate", "--", "ifedicl", "recalibrate", *common,
                "--mode", "stage2", "--margin", -1, "--json", "--kept-live-ok"], env)  # fmt: skip
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-3000:]
    assert _job_status(cluster, "ifedicl-recalibrate") == "SUCCEEDED"
    log = _job_logs(cluster, "ifedicl-recalibrate")
    (event,) = _events(log, "recalibration")
    assert event["decision"] == "kept_live" and event["live"] == run["run_id"]
    (attempt,) = attempts(Store(store))
    assert attempt["decision"] == "kept_live" and attempt["candidate_run_id"] == event["candidate"]
    assert Store(store).published_run_id(task) == run["run_id"]  # nothing published
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in RecalibrationCollector(str(store)).collect()
        for s in family.samples
    }
    assert samples[("ifedicl_recalibration_attempts_total", (("decision", "kept_live"), ("task", task)))] == 1
    assert samples[("ifedicl_recalibration_consecutive_failures", (("task", task),))] == 0
    print(f"\njob-submit test: {time.monotonic() - started:.1f}s wall (head start, refused submit, 2 jobs)")


def test_two_nodes_hold_one_weight_copy_each_and_survive_a_killed_node(cluster, llama_dir, task_dir, tmp_path):
    """Four clients, two per node (two CPUs each, one CPU per client). Round 1 with every client equals
    the single-node run's round 1; then the worker node is SIGKILLed before round 2 asks its clients."""
    started = time.monotonic()
    reference = tmp_path / "single-node.json"
    # The single-node reference (a local Ray of its own) runs while the two nodes start.
    single_node = subprocess.Popen(
        [sys.executable, str(DRIVER), str(reference), "--model", str(llama_dir), "--task-dir", str(task_dir),
         "--store", str(tmp_path / "single-store"), "--cpus-per-client", "0.5",
         "--temp-dir", str(cluster.root / "ref")],  # under the cluster's root: stopped with it if need be
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    cluster.env.update(FAST_HEALTH_CHECKS)
    cluster.start_head(num_cpus=2)
    worker = cluster.add_worker(num_cpus=2, resources={"second_node": 1})
    single_output, _ = single_node.communicate(timeout=300)
    assert single_node.returncode == 0, single_output[-3000:]
    report_path, store = tmp_path / "two-node.json", tmp_path / "two-store"
    two = _run([sys.executable, DRIVER, report_path, "--model", llama_dir, "--task-dir", task_dir, "--store", store,
                "--address", cluster.gcs_address, "--kill-node-pid", worker.process.pid], cluster.env)  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["probed"] and report["killed"]

    # Placement: two clients per node.
    nodes = report["nodes"]
    (worker_id,) = [n for n, info in nodes.items() if info["resources"].get("second_node")]
    (head_id,) = [n for n, info in nodes.items() if info["head"]]
    clients = report["clients"]
    on_worker = sorted(int(c) for c, p in clients.items() if p["node_id"] == worker_id)
    on_head = sorted(int(c) for c, p in clients.items() if p["node_id"] == head_id)
    assert len(on_worker) == 2 and len(on_head) == 2, clients

    # One copy of the weights per node: the object has one location on each node, each node's store holds
    # that one object and nothing else, and every client's tensors live inside its own node's store
    # mapping (one shared file per node, resident in each client), not in private memory.
    weights = report["weights"]
    assert sorted(weights["node_ids"]) == sorted([head_id, worker_id])
    for node_id in (head_id, worker_id):
        assert nodes[node_id]["store_objects"] == 1
        assert nodes[node_id]["store_bytes_used"] == weights["object_size"]
    assert weights["bytes"] <= weights["object_size"] < weights["bytes"] + 64 * 1024
    mappings = {}
    for probe in clients.values():
        mapping = probe["weights_mapping"]
        assert probe["all_weights_in_mapping"] and mapping["path"].startswith("/dev/shm/plasma"), probe
        assert mapping["rss_bytes"] >= weights["bytes"] * 0.9  # the client reads the weights from that mapping
        mappings.setdefault(probe["node_id"], set()).add((mapping["device"], mapping["inode"]))
    assert all(len(files) == 1 for files in mappings.values()) and mappings[head_id] != mappings[worker_id]

    # Raw text stays on the client's node: each actor holds exactly its shard, read from disk on its own
    # node (the driver sent it the data's location and indices; the worker node's object store received
    # only the weights object).
    for cid, probe in clients.items():
        assert probe["texts_sha256"] == report["shards"][cid] and probe["examples"] > 0

    # Round 1 (all four clients) equals the single-node run: same vectors, same Λ.
    single = json.loads(reference.read_text())
    a = Store(tmp_path / "single-store")
    b = Store(store)
    task = a.run_row(single["run_id"])["task"]
    ref_run, two_run = a.load_run(task, single["run_id"]), b.load_run(task, report["run_id"])
    np.testing.assert_allclose(two_run.vectors, ref_run.vectors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        b.coefficients_by_round(report["run_id"])[1], a.coefficients_by_round(single["run_id"])[1], rtol=1e-5, atol=1e-6
    )
    assert single["shards"] == report["shards"]

    # The worker node killed before round 2: its clients dropped and recorded, the round done with the rest.
    rounds = {r["round"]: r for r in report["rounds"]}
    assert rounds[1]["answered"] == [0, 1, 2, 3]
    assert rounds[2]["answered"] == on_head and len(on_head) >= 2  # --min-clients 2
    assert sorted(int(c) for c in rounds[2]["dropped"]) == on_worker
    assert all(why.startswith("client died") for why in rounds[2]["dropped"].values()), rounds[2]
    recorded = {r["round"]: json.loads(r["dropped"]) for r in b.rounds(report["run_id"])}
    assert recorded[2] == rounds[2]["dropped"]
    assert b.run_row(report["run_id"])["status"] == "complete" and b.published_run_id(task) == report["run_id"]
    print(
        f"\ntwo-node test: {time.monotonic() - started:.1f}s wall; "
        f"weights {weights['bytes']} B, object {weights['object_size']} B; "
        + "; ".join(
            f"{'head' if n == head_id else 'worker'}: {nodes[n]['store_objects']} object(s), "
            f"{nodes[n]['store_bytes_used']} B in its store"
            for n in (head_id, worker_id)
        )
    )


def test_each_organisations_client_runs_on_the_node_holding_its_data(cluster, llama_dir, task_dir, tmp_path):
    """Two nodes on one machine, each mounting one organisation's data at its own IFEDICL_DATA_ROOT; org-a's
    node is found by a custom resource, org-b's by a node label. Each client names its files relative to
    its node's data root, and each node holds only its own organisation's files: a client placed on the
    other node would not find its data and be dropped, and --min-clients 2 would fail the run. The run
    completes, publishes, and is scored by both clients on their own held-out files; the driver (audited,
    with no data root of its own) opens none of them."""
    started = time.monotonic()
    data = load_task_dir(task_dir)
    roots = {"org-a": tmp_path / "node-a" / "data", "org-b": tmp_path / "node-b" / "data"}
    for i, (org, root) in enumerate(roots.items()):
        root.mkdir(parents=True)
        for split, rows, n in (("train", data.train, 30), ("test", data.test, 10)):
            lines = [json.dumps({"text": t, "label": y}) for t, y in zip(rows.texts[i * n :], rows.labels[i * n :])]
            (root / f"{org}-{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
    task = data.task
    config = tmp_path / "orgs.toml"
    config.write_text(
        f"rounds = 1\nmin_clients = 2\n\n[task]\nname = {json.dumps(task.name)}\n"
        f"template = {json.dumps(task.template)}\nlabels = {json.dumps(list(task.labels))}\n\n"
        '[[clients]]\nname = "org-a"\ndata = "org-a-train.jsonl"\ntest = "org-a-test.jsonl"\nplacement = "org-a"\n\n'
        '[[clients]]\nname = "org-b"\ndata = "org-b-train.jsonl"\ntest = "org-b-test.jsonl"\n'
        'placement = "label:org=b"\n'
    )
    cluster.start_head(num_cpus=2, resources={"org-a": 1}, env={"IFEDICL_DATA_ROOT": str(roots["org-a"])})
    cluster.add_worker(num_cpus=2, labels="org=b", env={"IFEDICL_DATA_ROOT": str(roots["org-b"])})
    store, audit = tmp_path / "store", tmp_path / "audit.json"
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    env.pop("IFEDICL_DATA_ROOT", None)
    fed = _run([sys.executable, AUDITED, audit, ",".join(str(r) for r in roots.values()), "--", "federate",
                "--config", config, "--model", llama_dir, "--store", store, "--publish"], env)  # fmt: skip
    assert fed.returncode == 0, fed.stdout[-3000:] + fed.stderr[-3000:]
    assert json.loads(audit.read_text()) == []  # the driver opened neither organisation's files
    stored = Store(store)
    (run,) = stored.runs()
    assert run["status"] == "complete" and stored.published_run_id(run["task"]) == run["run_id"]
    summary = json.loads(run["summary"])
    assert all(not json.loads(r["dropped"]) for r in stored.rounds(run["run_id"]))  # nobody misplaced
    clients = summary["federated_evaluation"]["clients"]
    assert {name: c["test_examples"] for name, c in clients.items()} == {"org-a": 10, "org-b": 10}
    assert summary["evaluated_by"] == "clients" and summary["test_examples"] == 20
    print(f"\ntwo-organisation test: {time.monotonic() - started:.1f}s wall")
