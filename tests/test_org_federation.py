"""Federation across organisations' own data: clients named in ``--config``, each reading its own files.

The driver runs under an audit hook (tests/audited_driver.py) that records every file it opens or lists
under the organisations' directories: it must be none. The clients (Ray workers, fresh interpreters)
read them. A client with bad data is dropped by name and the run goes on; the run's accuracy is
the clients' pooled per-class counts on their own held-out splits, and recalibration's guardrail
compares candidate and live run on those same splits.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ifedicl.devkit.demo_data import make_sentiment_dir
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.population import Population
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.sources import ClientSource, DataSource
from ifedicl.storage.store import Store

DRIVER = Path(__file__).with_name("audited_driver.py")


def _write_jsonl(path: Path, texts, labels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))


@pytest.fixture(scope="module")
def orgs(tmp_path_factory, task_dir):
    """Four organisations' folders, none of which the driver may open, and the run config naming them.

    org-a: a task directory (its own task.json, train and test); org-b: a CSV file and a held-out JSONL;
    org-c: a label the task does not define; org-d: an empty held-out file.
    """
    root = tmp_path_factory.mktemp("orgs")
    data = load_task_dir(task_dir)
    train, test, task = data.train, data.test, data.task
    a = root / "org-a"
    _write_jsonl(a / "train.jsonl", train.texts[:30], train.labels[:30])
    _write_jsonl(a / "test.jsonl", test.texts[:10], test.labels[:10])
    (a / "task.json").write_text(json.dumps({"name": task.name, "template": task.template, "labels": task.labels}))
    b = root / "org-b"
    b.mkdir()
    with (b / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((t, task.labels[y]) for t, y in zip(train.texts[30:60], train.labels[30:60]))
    _write_jsonl(b / "heldout.jsonl", test.texts[10:], test.labels[10:])
    _write_jsonl(root / "org-c" / "train.jsonl", ["fine", "meh"], ["positive", "neutral"])
    _write_jsonl(root / "org-d" / "train.jsonl", train.texts[60:70], train.labels[60:70])
    (root / "org-d" / "heldout.jsonl").write_text("")
    labels = ", ".join(json.dumps(w) for w in task.labels)
    config = root / "orgs.toml"
    config.write_text(
        f"rounds = 1\nmin_clients = 2\nlocal_epochs = 0.5\n\n[task]\nname = {json.dumps(task.name)}\n"
        f"template = {json.dumps(task.template)}\nlabels = [{labels}]\n\n"
        '[[clients]]\nname = "org-a"\ndata = "org-a"\n\n'
        '[[clients]]\nname = "org-b"\ndata = "org-b/train.csv"\ntest = "org-b/heldout.jsonl"\n\n'
        '[[clients]]\nname = "org-c"\ndata = "org-c/train.jsonl"\n\n'
        '[[clients]]\nname = "org-d"\ndata = "org-d/train.jsonl"\ntest = "org-d/heldout.jsonl"\n'
    )
    return {"root": root, "config": config, "dirs": [root / n for n in ("org-a", "org-b", "org-c", "org-d")]}


def _audited(orgs, audit: Path, *args) -> subprocess.CompletedProcess:
    roots = ",".join(str(d) for d in orgs["dirs"])
    cmd = [sys.executable, str(DRIVER), str(audit), roots, "--", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_clients_read_their_own_files_the_driver_none_and_the_run_is_scored_by_the_clients(
    orgs, llama_dir, tmp_path
):
    store_dir = tmp_path / "store"
    common = ["--config", orgs["config"], "--model", llama_dir, "--store", store_dir]
    fed = _audited(orgs, tmp_path / "federate.json", "federate", *common, "--publish")
    assert fed.returncode == 0, fed.stdout[-2000:] + fed.stderr[-3000:]
    assert json.loads((tmp_path / "federate.json").read_text()) == []  # the driver opened none of their files

    store = Store(store_dir)
    (run,) = store.runs()
    assert run["status"] == "complete" and store.published_run_id(run["task"]) == run["run_id"]
    summary = json.loads(run["summary"])
    assert summary["client_names"] == {"0": "org-a", "1": "org-b", "2": "org-c", "3": "org-d"}
    dropped = json.loads(store.rounds(run["run_id"])[0]["dropped"])
    assert sorted(dropped) == ["2", "3"]
    assert "client 'org-c'" in dropped["2"] and "'neutral'" in dropped["2"]
    assert "client 'org-d'" in dropped["3"] and "held-out split" in dropped["3"] and "empty" in dropped["3"]
    assert summary["shard_sizes"] == [30, 30]  # what the two clients said they hold: counts, not rows

    # federated evaluation: per-client counts on their own held-out splits, pooled into the run's accuracy
    report = summary["federated_evaluation"]
    assert set(report["clients"]) == {"org-a", "org-b"} and report["dropped"] == {}
    a, b = report["clients"]["org-a"], report["clients"]["org-b"]
    assert (a["test_examples"], b["test_examples"]) == (10, 10)
    assert summary["evaluated_by"] == "clients" and summary["test_examples"] == 20
    assert summary["accuracy"] == pytest.approx((a["accuracy"] * 10 + b["accuracy"] * 10) / 20)
    assert summary["zero_shot_accuracy"] == pytest.approx((a["zero_shot_accuracy"] + b["zero_shot_accuracy"]) / 2)
    per_class = report["pooled_per_class"]
    assert sum(per_class["total"]) == 20 and sum(per_class["injected"]) == round(summary["accuracy"] * 20)

    # recalibration: the guardrail compares candidate and live run on the clients' held-out splits. A margin
    # of -1 demands an impossible gain, so it keeps the live run, with the live accuracy the clients measured.
    rec = _audited(
        orgs, tmp_path / "recalibrate.json", "recalibrate", *common, "--mode", "stage2", "--margin", -1, "--json",
        "--kept-live-ok",
    )  # fmt: skip
    assert rec.returncode == 0, rec.stdout[-2000:] + rec.stderr[-3000:]
    assert json.loads((tmp_path / "recalibrate.json").read_text()) == []
    attempt = json.loads(rec.stdout.strip().splitlines()[-1])
    assert attempt["decision"] == "kept_live" and attempt["live_run_id"] == run["run_id"]
    assert "scored by the clients" in attempt["metrics"]["live_scoring"]
    assert attempt["eval_examples"] == 20
    # the live run, scored again by the clients with the same vectors and Λ, gets the accuracy it recorded
    assert attempt["live_accuracy"] == pytest.approx(summary["accuracy"])


def _write_config(path: Path, body: str, task) -> Path:
    """``body``'s top-level keys, the task table, then ``body``'s tables (TOML keys after a header are the table's)."""
    top, tables = body.split("[[", 1) if "[[" in body else (body, "")
    labels = ", ".join(json.dumps(w) for w in task.labels)
    head = f'[task]\nname = "{task.name}"\ntemplate = {json.dumps(task.template)}\nlabels = [{labels}]\n\n'
    path.write_text(top + head + ("[[" + tables if tables else ""))
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[clients]]\nname = "org-a"\ndata = "a.jsonl"\n\n[[clients]]\nname = "org-a"\ndata = "b.jsonl"\n',
         "client names must be unique: 'org-a'"),
        ('[[clients]]\nname = "org-a"\n', "client 'org-a': needs data"),
        ('[[clients]]\nname = "org-a"\ndata = "a.jsonl"\nshard = 3\n', "client 'org-a': unknown key(s) ['shard']"),
        ('roundz = 3\n', "'roundz' is not a flag of `ifedicl federate`"),
        ('[task.extra]\nx = 1\n', "[task] takes name, template and a list of labels"),
    ],
)  # fmt: skip
def test_a_bad_run_config_is_one_line_naming_what_is_wrong(body, message, task_dir, llama_dir, tmp_path):
    config = _write_config(tmp_path / "bad.toml", body, load_task_dir(task_dir).task)
    store = tmp_path / "store"
    cmd = ["ifedicl", "federate", "--config", config, "--model", llama_dir, "--store", store]
    proc = subprocess.run([sys.executable, "-m", "ifedicl.cli", *map(str, cmd[1:])], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()  # nothing written


def test_a_flag_on_the_command_line_overrides_the_config_file(tmp_path):
    """`rounds = 3` in the file, `--rounds 0` given: the flag wins (checked by the error it leads to)."""
    config = tmp_path / "run.toml"
    config.write_text("rounds = 3\nclients = 0\n")
    cmd = [sys.executable, "-m", "ifedicl.cli", "federate", "--config", str(config), "--model", "m", "--store", "s"]
    from_file = subprocess.run([*cmd, "--task-dir", str(tmp_path)], capture_output=True, text=True)
    assert from_file.returncode == 2 and "--clients must be >= 1 (got 0)" in from_file.stderr
    overridden = subprocess.run([*cmd, "--clients", "-2", "--task-dir", str(tmp_path)], capture_output=True, text=True)
    assert overridden.returncode == 2 and "(got -2)" in overridden.stderr


def test_a_placement_no_node_has_fails_before_anything_is_written(ray_session, llama_dir, task_dir, tmp_path):
    task = load_task_dir(task_dir).task
    clients = [
        ClientSource("org-a", DataSource(str(task_dir))),
        ClientSource("org-b", DataSource(str(task_dir)), placement="org-b-data"),
    ]
    store_dir = tmp_path / "store"
    fed = Federation(str(llama_dir), Population.of(task, clients), str(store_dir), FederationSettings(rounds=1))
    with pytest.raises(IfediclError, match="client 'org-b': no alive Ray node offers placement 'org-b-data'"):
        fed.run(publish=True)
    assert Store(store_dir).runs() == []


def test_a_hundred_virtual_clients_on_two_actors_with_sampling_and_one_dropped(ray_session, llama_dir, tmp_path):
    """100 clients, 2 host processes; each round samples a tenth of them; client 37's data is missing."""
    data_dir = make_sentiment_dir(tmp_path / "big", n_train=300, n_test=0)
    population = Population.simulate(DataSource(str(data_dir)), clients=100, alpha=100.0, seed=0, min_shard=2)
    members = list(population.clients)
    members[37] = ClientSource("client-37", DataSource(str(tmp_path / "gone.jsonl"), "file"), indices=(0, 1))
    population = Population.of(population.task, members)
    hosts: set = set()

    def note_hosts(stage, round_index, results, actors):
        hosts.update(actor._actor_id for actor in actors.values())

    settings = FederationSettings(
        clients=100, actors=2, rounds=2, fraction=0.1, min_clients=5, round_timeout_s=300, local_epochs=1, seed=0
    )
    fed = Federation(str(llama_dir), population, str(tmp_path / "store"), settings, after_gather=note_hosts)
    result = fed.run()
    assert len(hosts) == 2  # a hundred clients, two processes
    r0, r1, r2 = result.rounds
    assert list(r0.dropped) == [37] and "client 'client-37'" in r0.dropped[37] and "does not exist" in r0.dropped[37]
    assert len(r0.clients_answered) == 99
    for r in (r1, r2):
        assert len(r.clients_sampled) == 10 and 37 not in r.clients_sampled and r.clients_answered == r.clients_sampled
    assert r1.clients_sampled != r2.clients_sampled  # sampled afresh each round
    assert np.isfinite(result.coefficients).all() and len(result.summary["shard_sizes"]) == 99


def test_hosting_clients_together_changes_nothing_they_compute(ray_session, llama_dir, task_dir, tmp_path):
    """The same simulated federation with one host per client and with all four clients on one host."""
    source = DataSource(str(task_dir), max_test=0)

    def run(actors: int):
        settings = FederationSettings(clients=4, actors=actors, alpha=1.0, rounds=2, min_clients=4, min_shard=4)
        return Federation(str(llama_dir), source, str(tmp_path / f"s{actors}"), settings).run()

    apart, together = run(4), run(1)
    np.testing.assert_allclose(apart.vectors, together.vectors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apart.coefficients, together.coefficients, rtol=1e-4, atol=1e-6)


def test_an_upload_claiming_more_examples_than_its_client_joined_with_is_rejected(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Weighted means trust each upload's example count: client 1 claims 500 (a whole, plausible number) and is
    rejected in stage 1; the others' weighted run completes without it."""
    settings = FederationSettings(
        clients=3, alpha=100.0, rounds=1, min_clients=2, min_shard=4, weighted_vectors=True,
        weighted_coefficients=True, adversaries={1: "count:500"},
    )  # fmt: skip
    result = Federation(str(llama_dir), DataSource(str(task_dir), max_test=0), str(tmp_path / "s"), settings).run()
    joined = result.summary["shard_sizes"][1]
    stage1, round1 = result.rounds
    assert stage1.dropped == {1: f"rejected update: claims 500 examples, joined with {joined}"}
    assert stage1.clients_answered == round1.clients_answered == [0, 2]  # no global vectors: no calibration
