"""Differential privacy: noise calibrated by the accountant, clipping bounds each example, the run records ε."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from scipy.stats import norm

from ifedicl.federation_job.driver import Federation, FederationSettings
from ifedicl.federation_job.privacy import ClientPrivacy, PrivacySettings, noise_multiplier, spent_epsilon
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.kernel.sources import DataSource
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import capture_sum, clip_rows
from ifedicl.storage.store import Store


def _analytic_delta(epsilon: float, sigma: float) -> float:
    """Exact δ(ε) of a sensitivity-1 Gaussian mechanism of std σ (Balle & Wang 2018, Thm 8)."""
    return norm.cdf(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * norm.cdf(
        -1 / (2 * sigma) - epsilon * sigma
    )


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 8.0])
def test_noise_multiplier_matches_the_gaussian_mechanism_formula(epsilon):
    delta = 1e-5
    z = noise_multiplier(epsilon, delta)
    assert _analytic_delta(epsilon, z) == pytest.approx(delta, rel=0.05)
    assert z == pytest.approx(dp_accounting.get_sigma_gaussian(epsilon, delta), rel=0.01)
    # R Gaussian releases of std z compose to one of std z / sqrt(R): calibrated z grows by sqrt(R)
    assert noise_multiplier(epsilon, delta, 4) == pytest.approx(2 * z, rel=0.02)
    assert spent_epsilon([(z, 1)], delta) == pytest.approx(epsilon, rel=0.02)


def test_noise_std_follows_the_sensitivity():
    policy = ClientPrivacy(
        vector_clip=2.0, vector_noise_multiplier=3.0, coefficient_clip=0.1, coefficient_noise_multiplier=1.5
    )
    assert policy.vector_noise_std(40) == pytest.approx(3.0 * 2 * 2.0 / 40)
    assert policy.coefficient_noise_std() == pytest.approx(1.5 * 2 * 0.1)
    start = np.ones((4, 2, 2), np.float32)
    rng = np.random.default_rng(0)
    deltas = np.stack([policy.privatise_coefficients(start + 5.0, start, rng) - start for _ in range(4000)])
    assert deltas.std() == pytest.approx(0.3, rel=0.05)  # z * 2 C
    # the clipped delta (before noise) has norm C: its mean over many draws is the clipped direction
    assert np.linalg.norm(deltas.mean(axis=0)) == pytest.approx(0.1, rel=0.15)


def test_clip_rows_bounds_every_row():
    rows = torch.randn(16, 50) * torch.logspace(-2, 2, 16)[:, None]
    clipped = clip_rows(rows, 1.0)
    assert torch.all(clipped.norm(dim=1) <= 1.0 + 1e-5)
    small = rows.norm(dim=1) <= 1.0
    assert torch.allclose(clipped[small], rows[small])


def test_clipping_really_bounds_each_example_in_the_captured_sum(llama_dir, task_dir):
    """Removing any one example moves the clipped sum by at most C (and the unclipped one by more)."""
    data = load_task_dir(task_dir)
    ctx = HFContextModel(load_model(str(llama_dir)))
    tokenizer = load_tokenizer(str(llama_dir))
    demos = [data.task.demonstration(t, y) for t, y in zip(data.train.texts[:9], data.train.labels[:9])]
    raw = capture_sum(ctx, tokenizer, demos, batch_size=4)
    clip = 0.1  # example norms on this tiny model are ~0.5
    full = capture_sum(ctx, tokenizer, demos, batch_size=4, clip_norm=clip)
    for i in (0, 4, 8):
        rest = demos[:i] + demos[i + 1 :]
        moved = float((full - capture_sum(ctx, tokenizer, rest, batch_size=4, clip_norm=clip)).norm())
        unclipped = float((raw - capture_sum(ctx, tokenizer, rest, batch_size=4)).norm())
        assert moved <= clip * (1 + 1e-4)
        assert unclipped > 2 * clip  # the bound is doing something on this model


def test_dp_federation_records_its_privacy_parameters(ray_session, llama_dir, task_dir, tmp_path):
    privacy = PrivacySettings(vector_epsilon=4.0, vector_clip=0.5, coefficient_epsilon=2.0, coefficient_clip=0.05)
    settings = FederationSettings(
        clients=2, alpha=1.0, rounds=2, min_clients=2, round_timeout_s=120, min_shard=4, privacy=privacy
    )
    store = tmp_path / "store"
    fed = Federation(str(llama_dir), DataSource(str(task_dir), max_train=30, max_test=0), str(store), settings)
    result = fed.run()
    report = result.summary["privacy"]
    assert report["vectors"]["epsilon"] == pytest.approx(4.0, rel=0.02)
    assert report["coefficients"]["rounds"] == 2 and report["coefficients"]["epsilon"] == pytest.approx(2.0, rel=0.02)
    assert report["total_epsilon"] > 4.0 and "dp_accounting" in report["accountant"]
    assert report["vectors"]["noise_multiplier"] == pytest.approx(noise_multiplier(4.0, 1e-5), rel=1e-6)
    row = Store(store).run_row(result.run_id)
    recorded = json.loads(row["settings"])
    assert recorded["privacy"]["vector_epsilon"] == 4.0
    assert recorded["client_privacy"]["vector_noise_multiplier"] == pytest.approx(report["vectors"]["noise_multiplier"])
    assert json.loads(row["summary"])["privacy"]["total_epsilon"] == pytest.approx(report["total_epsilon"])
    assert np.all(np.isfinite(result.vectors)) and np.all(np.isfinite(result.coefficients))
