"""FedAvg-LoRA through the same Ray job as IFed-ICL: bytes, drops, FedAvg of the adapters, client compute.

Real local Ray, real actors, real peft adapters, real kills (tests/actor_kills.py), real LanceDB.
"""

import json

import numpy as np
import pytest
from actor_kills import kill_and_wait
from compute_checks import check_compute_totals
from transformers import AutoConfig

from ifedicl.federation_job import wire
from ifedicl.federation_job.driver import FederationSettings
from ifedicl.federation_job.lora import LoraSettings
from ifedicl.federation_job.lora_federation import LoraFederation
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.sources import DataSource
from ifedicl.storage.store import Store

RANK = 4


def test_fedavg_lora_on_ray_bytes_drops_weighted_mean_and_compute(ray_session, llama_dir, task_dir, tmp_path):
    uploads: dict[int, dict[int, bytes]] = {}

    def keep_uploads_and_kill_1_after_round_1(stage, round_index, results, actors):
        if stage == "train":
            uploads[round_index] = dict(results)
            if round_index == 1:
                kill_and_wait(actors[1])  # it uploaded round 1, and is dead before round 2

    settings = FederationSettings(
        clients=3, alpha=1.0, rounds=2, min_clients=2, round_timeout_s=120, min_shard=4, weighted_coefficients=True
    )
    settings.calibration = type(settings.calibration)(objective="label-only")
    store_dir = tmp_path / "store"
    fed = LoraFederation(
        str(llama_dir), DataSource(str(task_dir), max_test=8), str(store_dir), settings, None,
        keep_uploads_and_kill_1_after_round_1, lora=LoraSettings(rank=RANK, alpha=2 * RANK, lr=1e-2),
    )  # fmt: skip
    with pytest.raises(IfediclError, match="nothing to publish|no context vectors"):
        fed.run(publish=True)
    result = fed.run()
    r0, r1, r2 = result.rounds
    assert r0.clients_answered == [0, 1, 2] and r0.bytes_up == [0, 0, 0]
    assert r1.clients_answered == [0, 1, 2] and not r1.dropped
    assert list(r2.dropped) == [1] and "died" in r2.dropped[1] and r2.clients_answered == [0, 2]
    assert json.loads(Store(store_dir).rounds(result.run_id)[2]["dropped"]) == {"1": r2.dropped[1]}

    # Bytes: what was counted is len() of each client's payload, the wire encoding of its adapters.
    config = AutoConfig.from_pretrained(llama_dir)
    d, head = config.hidden_size, config.head_dim
    q_out, v_out = config.num_attention_heads * head, config.num_key_value_heads * head
    parameter_bytes = 4 * config.num_hidden_layers * sum(RANK * d + out * RANK for out in (q_out, v_out))
    for record in (r1, r2):
        payloads = uploads[record.round]
        assert record.bytes_up == [len(payloads[c]) for c in record.clients_answered]
        for cid in record.clients_answered:
            arrays, meta = wire.decode(payloads[cid])
            sent = fed.states[record.round - 1]  # the global adapters the client started from
            assert sorted(arrays) == sorted(sent) and all(arrays[n].shape == sent[n].shape for n in arrays)
            assert sum(a.nbytes for a in arrays.values()) == parameter_bytes
            assert len(wire.encode(arrays, **meta)) == len(payloads[cid])
        assert all(b > parameter_bytes for b in record.bytes_down)

    # The global adapters after each round: the mean of the clients' uploads weighted by their example counts.
    assert len(set(result.summary["shard_sizes"])) > 1  # unequal shards: weighted differs from unweighted
    for record in (r1, r2):
        decoded = [wire.decode(uploads[record.round][c]) for c in record.clients_answered]
        weights = np.array([meta["num_examples"] for _, meta in decoded], dtype=np.float64)
        assert weights.tolist() == [result.summary["shard_sizes"][c] for c in record.clients_answered]
        for name, value in fed.states[record.round].items():
            expected = sum(w * arrays[name] for w, (arrays, _) in zip(weights / weights.sum(), decoded))
            np.testing.assert_allclose(value, expected, atol=1e-6)
    lora_b = [n for n in fed.states[0] if "lora_B" in n]
    assert all(not fed.states[0][n].any() for n in lora_b)  # B starts at zero ...
    assert any(fed.states[2][n].any() for n in lora_b)  # ... and training moved it

    summary = result.summary
    check_compute_totals(summary, {"train"}, {0, 1, 2})
    assert summary["round_bytes_up_per_client"] == max(r1.bytes_up + r2.bytes_up)
    assert 0 <= summary["accuracy"] <= 1 and summary["test_examples"] == 8
    settings_row = json.loads(Store(store_dir).run_row(result.run_id)["settings"])
    assert settings_row["method"] == "fedavg-lora" and settings_row["lora"]["rank"] == RANK
    assert settings_row["calibration"]["objective"] == "label-only"
