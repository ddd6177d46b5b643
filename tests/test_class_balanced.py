"""Class-balanced stage 1 (``--stage1 class-balanced``): the federation's vectors are the centralized
class-balanced mean exactly, whatever the label skew; a bad class upload is a recorded rejection."""

from __future__ import annotations

import numpy as np
import pytest

from ifedicl.federation_job.class_balanced import check_class_upload, pooled_mean
from ifedicl.federation_job.client import Client
from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.kernel.sources import DataSource
from ifedicl.model_patches.hf import HFContextModel


def test_pooling_weighs_each_class_by_its_examples_over_all_clients_then_averages_the_classes():
    rng = np.random.default_rng(0)
    shape = (2, 2, 3)  # [L, 2, d]
    a_means, a_counts = rng.normal(size=(3, *shape)), np.array([5, 1, 0])  # client a: no class 2
    b_means, b_counts = rng.normal(size=(3, *shape)), np.array([1, 3, 0])  # nobody has class 2
    pooled = pooled_mean([(a_means, a_counts), (b_means, b_counts)])
    class0 = (5 * a_means[0] + 1 * b_means[0]) / 6
    class1 = (1 * a_means[1] + 3 * b_means[1]) / 4
    np.testing.assert_allclose(pooled, (class0 + class1) / 2, rtol=1e-6)  # class 2: absent, not a zero vector
    # the paper's mean of client means leans to client a's class 0
    assert not np.allclose(pooled, (a_counts @ a_means.reshape(3, -1) / 6 + b_counts @ b_means.reshape(3, -1) / 4)
                           .reshape(shape) / 2)  # fmt: skip


@pytest.mark.parametrize(
    "counts, means, message",
    [
        (np.array([2, 9]), np.zeros((2, 2, 2, 3)), "at most 10"),  # more than it joined with... (11 > 10)
        (np.array([2.0, 1.0]), np.zeros((2, 2, 2, 3)), "whole"),
        (np.array([-1, 3]), np.zeros((2, 2, 2, 3)), "non-negative"),
        (np.array([1, 1]), np.zeros((3, 2, 2, 3)), "do not fit"),
        (np.array([1, 1]), np.full((2, 2, 2, 3), np.nan), "finite"),
    ],
)
def test_a_bad_class_upload_is_refused_naming_what_is_wrong(counts, means, message):
    with pytest.raises(FederationError, match=message):
        check_class_upload(means, counts, (2, 2, 3), joined=10)


def test_the_federated_class_balanced_vectors_are_the_centralized_ones(ray_session, llama_dir, task_dir, tmp_path):
    """Three clients under strong label skew (α=0.3): the pooled vectors equal the class-balanced mean of all
    their examples computed in one place (float32 on the wire), and differ from the paper's mean of means."""
    source = DataSource(str(task_dir), max_test=0)
    base = dict(clients=3, alpha=0.3, rounds=1, min_clients=3, min_shard=4, vector_coding="float32",
                stage1_examples=None)  # every example, as the central computation
    settings = FederationSettings(**base, stage1="class-balanced")
    result = Federation(str(llama_dir), source, str(tmp_path / "b"), settings).run()
    data = load_task_dir(task_dir)
    ctx = HFContextModel(load_model(str(llama_dir)))
    everyone = Client(ctx, load_tokenizer(str(llama_dir)), data.task, data.train)
    central = pooled_mean([everyone.extract_class_means(batch_size=8)])
    np.testing.assert_allclose(result.vectors, central, rtol=1e-4, atol=1e-5)
    plain = Federation(str(llama_dir), source, str(tmp_path / "p"), FederationSettings(**base)).run()
    assert not np.allclose(plain.vectors, central, rtol=1e-4, atol=1e-5)
    assert result.summary["stage1_bytes_up_per_client"] > 2 * plain.summary["stage1_bytes_up_per_client"] - 4096


def test_class_balanced_stage_one_is_refused_with_robust_secure_or_private_aggregation():
    for extra in ({"aggregator": "median"}, {"secagg": True, "min_clients": 2}):
        with pytest.raises(IfediclError, match="--stage1 class-balanced goes with"):
            FederationSettings(stage1="class-balanced", **extra).validate()
