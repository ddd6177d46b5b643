"""One federation run as a Ray driver, reporting where its clients ran and what each node holds.

Run by tests/test_cluster.py in a process of its own, so that the test process never joins a Ray
cluster (its in-process tests keep their own local Ray):

    python tests/cluster_federation.py REPORT.json --model M --task-dir D --store S \\
        [--address HOST:PORT] [--kill-node-pid PID]

Two rounds. Without ``--address`` it starts a local single-node Ray (the reference run). Once
round 1's answers are in (every client alive) it records, for each client: the node and pid of its
actor, the shared-memory mapping its model's tensors live in, and its data shard as the actor itself
read it from disk; for each node: its object store's use; for the shared weights object: its size
and the nodes holding a copy. With ``--kill-node-pid`` (the `ray start --block` pid of a node) it
then SIGKILLs every process of that node, before round 2's requests go out: the node is dead when
round 2 asks its clients. (Killing it after the requests were sent raced them: a tiny model's client
could answer round 2 first.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import ray

from ifedicl.federation_job.driver import Federation, FederationSettings, ensure_ray
from ifedicl.kernel.sources import DataSource

sys.path.insert(0, str(Path(__file__).parent))
from ray_nodes import kill_all, node_processes  # noqa: E402


def _mapping_of(address: int) -> dict:
    """The /proc/self/maps line that holds ``address``, and its resident size from smaps."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" not in head[0] or len(head) < 5 or ":" in head[0]:
            continue
        start, end = (int(x, 16) for x in head[0].split("-"))
        if start <= address < end:
            rss_kb = next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
            return {
                "path": " ".join(head[5:]),
                "inode": int(head[4]),
                "device": head[3],
                "start": start,
                "end": end,
                "rss_bytes": rss_kb * 1024,
            }
    return {}


def probe_client(host, client_id: int) -> dict:
    """Runs inside a client's host actor (``__ray_call__``): where it is, where its weights are, what data it holds."""
    model = host.ctx.model
    tensors = [p for p in model.parameters()]
    mapping = _mapping_of(tensors[0].data_ptr())
    inside = all(mapping and mapping["start"] <= t.data_ptr() < mapping["end"] for t in tensors)
    texts = host.clients[client_id].client.data.texts
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "weights_mapping": mapping,
        "all_weights_in_mapping": bool(inside),
        "examples": len(texts),
        "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
    }


def node_report() -> dict:
    """Per alive node: its custom resources and its object store's use (from the node's raylet)."""
    from ray._private.internal_api import node_stats

    out = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
        store = stats.store_stats
        out[node["NodeID"]] = {
            "head": "node:__internal_head__" in node["Resources"],
            "resources": {k: v for k, v in node["Resources"].items() if not k.startswith("node:")},
            "store_bytes_used": int(store.object_store_bytes_used),
            "store_objects": int(store.num_local_objects),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task-dir", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--address", default=None, help="GCS address of the cluster; none: a local Ray")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--min-clients", type=int, default=2)
    parser.add_argument("--kill-node-pid", type=int, default=None)
    parser.add_argument("--temp-dir", default=None, help="the local Ray's temp dir (short: unix socket paths)")
    args = parser.parse_args()

    report: dict = {"killed": [], "probed": False}
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
        ensure_ray()
    else:  # the reference: one local node, its own temp dir
        os.environ.pop("RAY_ADDRESS", None)
        temp_dir = args.temp_dir or tempfile.mkdtemp(prefix="ifr-ref-", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    settings = FederationSettings(
        clients=args.clients,
        alpha=1.0,
        rounds=2,
        min_clients=args.min_clients,
        round_timeout_s=120,
        min_shard=4,
        seed=0,
        weights="shared",
        cpus_per_client=args.cpus_per_client,
        actors=args.clients,  # one host per client: the test follows each client to its node
    )

    def after_gather(stage, round_index, results, actors):
        if stage == "calibrate" and round_index == 1:
            probes = ray.get([a.__ray_call__.remote(probe_client, cid) for cid, a in actors.items()])
            report["clients"] = dict(zip(map(str, actors), probes))
            shared = fed.shared_weights
            location = ray.experimental.get_object_locations([shared])[shared]
            report["weights"] = {
                "bytes": int(sum(b.nbytes for b in ray.get(shared).buffers.values())),
                "object_size": location["object_size"],
                "node_ids": location["node_ids"],
            }
            report["nodes"] = node_report()
            report["probed"] = True
            if args.kill_node_pid:
                pids = node_processes(args.kill_node_pid)
                kill_all(pids)  # SIGKILL, all at once: the node dies as a machine would
                report["killed"] = sorted(pids)

    source = DataSource(args.task_dir, max_test=8)
    fed = Federation(args.model, source, args.store, settings, after_gather=after_gather)
    report["nodes_before"] = node_report() if args.address else {}
    result = fed.run(publish=True)
    data = source.load()
    report.update(
        run_id=result.run_id,
        shards={
            str(cid): hashlib.sha256("\n".join(data.train.subset(ix).texts).encode()).hexdigest()
            for cid, ix in enumerate(client.indices for client in fed.population.clients)
        },
        rounds=[
            {"round": r.round, "answered": r.clients_answered, "dropped": {str(k): v for k, v in r.dropped.items()}}
            for r in result.rounds
        ],
    )
    args.report.write_text(json.dumps(report, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
