"""The recipe knobs the ablation varies: one schedule across rounds, attention/MLP-only Λ, stage-1 example count,
few-shot scoring on a shared prefix cache. Tiny random models; no accuracy asserted."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ifedicl.evaluation.settings import EvalSettings
from ifedicl.federation_job.client import CalibrationConfig, Client, local_epochs, round_passes, warmup_cosine
from ifedicl.federation_job.federation_settings import FederationSettings
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.kernel.task import label_token_ids
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import predict_proba
from ifedicl.model_patches.injection import BETA, LAM, initial_coefficients


def _client(model_dir, task_dir, n=12):
    data = load_task_dir(task_dir)
    ctx = HFContextModel(load_model(str(model_dir)))
    return Client(ctx, load_tokenizer(str(model_dir)), data.task, data.train.head(n))


def _lr_sum(config: CalibrationConfig, examples: int) -> float:
    """Adam with a constant gradient and no weight decay moves a parameter by exactly lr per step: the sum of lrs."""
    p = torch.nn.Parameter(torch.zeros(()))
    local_epochs([p], examples, config, 0, lambda rows: p * 1.0)
    return -float(p.detach())


def test_one_schedule_across_rounds_continues_where_the_last_round_stopped():
    base = dict(lr=1e-2, weight_decay=0.0, batch_size=2, epochs=1, rounds_total=3)
    examples, steps = 10, 5
    total = warmup_cosine(3 * steps, 0.05, 1e-2, 1e-5)
    for r in (1, 2, 3):
        moved = _lr_sum(CalibrationConfig(schedule="global", round_index=r, **base), examples)
        expected = sum(1e-2 * total(i) for i in range((r - 1) * steps, r * steps))
        assert moved == pytest.approx(expected, rel=1e-4), r
    restart = warmup_cosine(steps, 0.05, 1e-2, 1e-5)
    per_round = [_lr_sum(CalibrationConfig(round_index=r, **base), examples) for r in (1, 2, 3)]
    assert per_round == pytest.approx([sum(1e-2 * restart(i) for i in range(steps))] * 3, rel=1e-4)
    assert not math.isclose(per_round[2], _lr_sum(CalibrationConfig(schedule="global", round_index=3, **base), 10))


def test_a_fraction_of_an_epoch_takes_consecutive_windows_of_one_fixed_order():
    def window(r: int, seed: int) -> list[int]:
        [rows] = round_passes(10, CalibrationConfig(epochs=0.25, round_index=r), random.Random(seed))
        return rows

    assert [len(window(r, 0)) for r in (1, 2, 3, 4)] == [3, 3, 3, 3]  # ⌈0.25 × 10⌉
    assert set().union(*(window(r, 0) for r in (1, 2, 3, 4))) == set(range(10))  # 1/f rounds: every example
    assert not set(window(1, 0)) & set(window(2, 0)) and set(window(1, 0)) != set(window(2, 0))
    assert set(window(2, 0)) == set(window(2, 7))  # the run seed shuffles within the window, not the windows
    p = torch.nn.Parameter(torch.zeros(()))
    steps = local_epochs([p], 10, CalibrationConfig(epochs=0.25, batch_size=2), 0, lambda rows: p * len(rows))
    assert len(steps) == 2  # 3 examples in batches of 2


def test_whole_epochs_are_fresh_shuffles_as_before():
    rng, expected = random.Random(5), []
    for _ in range(2):
        order = list(range(7))
        rng.shuffle(order)
        expected.append(order)
    assert round_passes(7, CalibrationConfig(epochs=2), random.Random(5)) == expected


def test_a_party_alone_trains_whole_passes_then_the_first_part_of_a_fresh_shuffle():
    """Centralized I2CL at a federation's 6 rounds × ¼ window: 1.5 epochs, the second pass the first half of its
    own shuffle (each pass a permutation, so no example twice within one)."""
    first, second = round_passes(10, CalibrationConfig(epochs=1.5), random.Random(3))
    assert sorted(first) == list(range(10)) and len(second) == 5 and len(set(second)) == 5
    rng = random.Random(3)
    rng.shuffle(order := list(range(10)))
    rng.shuffle(again := list(range(10)))
    assert (first, second) == (order, again[:5])
    with pytest.raises(ValueError, match="or more than one"):
        round_passes(10, CalibrationConfig(epochs=0), random.Random(3))


def test_local_epochs_between_whole_numbers_are_refused():
    with pytest.raises(IfediclError, match="whole number >= 1 or a fraction"):
        FederationSettings(local_epochs=1.5).validate()
    with pytest.raises(ValueError, match="at least one pass"):
        EvalSettings(model="m", tasks=["t"], rounds=2, local_epochs=0.25).validate()
    EvalSettings(model="m", tasks=["t"], rounds=6, local_epochs=0.25).validate()  # I2CL central: 1.5 epochs
    assert EvalSettings(model="m", tasks=["t"], local_epochs=1.0).cell_hash() == EvalSettings("m", ["t"]).cell_hash()


@pytest.mark.parametrize("modules, off", [("attn", 1), ("mlp", 0)])
def test_one_block_only_leaves_the_other_uninjected(llama_dir, task_dir, modules, off):
    client = _client(llama_dir, task_dir)
    vectors = client.extract_vectors()
    start = initial_coefficients(client.ctx.num_layers).numpy()
    config = CalibrationConfig(epochs=2, modules=modules)
    result = client.calibrate(vectors, start, config, seed=0).coefficients
    assert np.all(result[:, off, LAM] == 0.0) and np.all(result[:, off, BETA] == 1.0)
    assert not np.allclose(result[:, 1 - off], start[:, 1 - off])  # the trained block moved


def test_stage1_examples_are_spaced_over_the_local_data(llama_dir, task_dir):
    """Four of twelve examples are rows 0, 3, 6 and 9: a file sorted by label still gives every class its share."""
    from ifedicl.federation_job.client import spaced

    assert spaced(list(range(12)), 4) == [0, 3, 6, 9] and spaced([1, 2], 5) == [1, 2] and spaced([1], None) == [1]
    assert spaced(list(range(7)), 3) == [0, 2, 4]
    client = _client(llama_dir, task_dir)
    chosen = Client(client.ctx, client.tokenizer, client.task, client.data.subset([0, 3, 6, 9]))
    np.testing.assert_allclose(client.extract_vectors(max_examples=4), chosen.extract_vectors(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(client.extract_vectors(), chosen.extract_vectors())
    means, counts = client.extract_class_means(max_examples=4)
    assert counts.sum() == 4 and np.array_equal(counts, chosen.extract_class_means()[1])


def test_stage1_examples_enter_only_ifedicl_cells_and_the_ablation_key_stands_over_the_option():
    """``--stage1-examples`` is IFed-ICL's clients' own: centralized I2CL and local-only calibration keep every
    example (the baselines at their strongest), so only an IFed-ICL cell's hash names it; a run pinning every
    example hashes as the cells computed before the option existed; the ablation's recipe key wins."""
    from types import SimpleNamespace

    from ifedicl.evaluation.context import federation_settings
    from ifedicl.evaluation.settings import Cell
    from ifedicl.federation_job.options import FederationOptions

    default, every = EvalSettings("m", ["t"]), EvalSettings("m", ["t"], federation={"stage1_examples": 0})
    assert FederationOptions().stage1_examples == 32
    assert default.federation_for_hash("ifedicl")["stage1_examples"] == 32
    assert "stage1_examples" not in every.federation_for_hash("ifedicl")  # as before the option existed
    assert every.cell_hash("ifedicl") != default.cell_hash("ifedicl")
    for method in ("fedavg_lora", "i2cl_central", "local_calibration", "zero_shot"):
        assert every.cell_hash(method) == default.cell_hash(method), method
    cell = Cell("ifedicl", "t", 0.5, 0)
    assert federation_settings(SimpleNamespace(settings=default), cell).stage1_examples == 32
    keyed = EvalSettings("m", ["t"], recipe={"stage1_examples": 5})
    assert federation_settings(SimpleNamespace(settings=keyed), cell).stage1_examples == 5
    assert federation_settings(SimpleNamespace(settings=every), cell).stage1_examples is None
    with pytest.raises(IfediclError, match="--stage1-examples must be >= 1"):
        federation_settings(SimpleNamespace(settings=EvalSettings("m", ["t"], federation={"stage1_examples": -1})),
                            cell).validate()  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_scoring_equals_full_prompts(tiny_models, task_dir, family):
    from ifedicl.evaluation.prefix import predict_proba_shared_prefix

    data = load_task_dir(task_dir)
    ctx = HFContextModel(load_model(str(tiny_models[family])))
    tokenizer = load_tokenizer(str(tiny_models[family]))
    demos = [data.task.demonstration(t, y) for t, y in zip(data.train.texts[:4], data.train.labels[:4])]
    prefixes = ["".join(demos)] * 10 + ["".join(demos[1:])] * 5 + [""]  # two shared prefixes and a bare prompt
    queries = [data.task.prompt(t) for t in data.test.texts[:16]]
    ids = label_token_ids(data.task, tokenizer)
    full = predict_proba(ctx, tokenizer, [p + q for p, q in zip(prefixes, queries)], ids, batch_size=4)
    stats: dict = {}
    cached = predict_proba_shared_prefix(ctx, tokenizer, prefixes, queries, ids, batch_size=4, stats=stats)
    np.testing.assert_allclose(cached, full, atol=1e-5)
    assert stats["cached"] == 15 and stats["fallback"] == 1 and stats["prefix_tokens_saved"] > 0
