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
        clients=2, alpha=1.0, rounds=2, min_clients=2, round_timeout_s=120, min_shard=4, privacy=privacy,
        stage2="local-steps",  # DP on Λ noises local steps' uploads (the second-order round has no noise model)
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


# ---------------------------------------------------------------- the noise itself, at the release point
# What a client uploads comes out of HostedClient.extract / .calibrate (bytes on the wire). These tests call
# those methods on a real actor object (no Ray: the driver only wraps the class) and take the noise as the
# release minus the same client's noise-free value, so deleting or mis-scaling the noise fails them.

NUM_EXAMPLES = 5  # the client's shard: the vector std divides by it (replace-one sensitivity 2 C_v / N_k)
# These tests draw many noisy releases from one client to measure the noise's scale: a release budget far
# above any run's (a run's is one vector release and one Λ release per round) lets them.
POLICY = ClientPrivacy(
    vector_clip=0.5, vector_noise_multiplier=2.0, coefficient_clip=0.05, coefficient_noise_multiplier=1.5,
    vector_releases=1_000_000, coefficient_releases=1_000_000,
)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, task_dir):
    """A tiny llama with 6 layers: Λ has 6 x 2 x 2 coordinates per release, v 6 x 2 x 128."""
    from ifedicl.devkit.demo_data import corpus
    from ifedicl.devkit.tiny_model import build_tiny_model

    data = load_task_dir(task_dir)
    return build_tiny_model(tmp_path_factory.mktemp("deep") / "llama", corpus(data.task, data.train.texts), "llama", 6)


def _actor(model, task_dir, policy=POLICY, client_id=0):
    from hosting import hosted_client

    return hosted_client(model, DataSource(str(task_dir)), list(range(NUM_EXAMPLES)), client_id, policy)


def _uploaded_vectors(actor) -> np.ndarray:
    from ifedicl.federation_job import wire

    arrays, _ = wire.decode(actor.extract(wire.encode({}, batch_size=8)))
    return arrays["vectors"].astype(np.float64)


CALIBRATION = {"epochs": 1, "batch_size": 2, "objective": "full-vocab"}  # its larger step: the clip is active


def _uploaded_coefficients(actor, start: np.ndarray, seed: int = 3) -> np.ndarray:
    from ifedicl.federation_job import wire

    arrays, _ = wire.decode(actor.calibrate(wire.encode({"coefficients": start}, config=CALIBRATION, seed=seed)))
    return arrays["coefficients"].astype(np.float64)


def _clean_vectors(actor) -> np.ndarray:
    """The same client's v_k, clipped per example as under its policy, without noise."""
    return actor.client.extract_vectors(8, clip_norm=actor.privacy.vector_clip).astype(np.float64)


def _assert_gaussian(noise: np.ndarray, std: float, rel: float) -> None:
    """Centred, of std ``std`` within ``rel``, and normal in shape (a uniform of the same std fails the KS test).

    ``rel`` is >= 4 standard errors of the sample std (about 1 / sqrt(2 n)), so a correct mechanism fails
    roughly once in 10^4 runs while a wrong factor (a missing 2, N_k, z) is off by 50% or more.
    """
    from scipy.stats import kstest

    noise = noise.ravel()
    n = noise.size
    assert rel >= 4 / math.sqrt(2 * n)
    assert noise.std() == pytest.approx(std, rel=rel), (noise.std(), std, n)
    assert abs(noise.mean()) < 5 * std / math.sqrt(n), (noise.mean(), std, n)  # 5 standard errors
    assert kstest(noise / std, "norm").pvalue > 1e-4


def test_uploaded_vectors_carry_gaussian_noise_of_the_calibrated_scale(deep_llama, task_dir):
    actor = _actor(deep_llama, task_dir)
    clean = _clean_vectors(actor)
    noise = np.stack([_uploaded_vectors(actor) - clean for _ in range(20)])  # 20 x 1,536 coordinates
    std = POLICY.vector_noise_multiplier * 2 * POLICY.vector_clip / NUM_EXAMPLES
    assert POLICY.vector_noise_std(NUM_EXAMPLES) == pytest.approx(std)
    _assert_gaussian(noise, std, rel=0.03)
    # fresh noise per release, not one draw reused: consecutive uploads are uncorrelated
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.15


def test_uploaded_coefficient_deltas_carry_gaussian_noise_of_the_calibrated_scale(deep_llama, task_dir):
    from ifedicl.federation_job.client import CalibrationConfig
    from ifedicl.federation_job.privacy import clip_vector

    actor = _actor(deep_llama, task_dir)
    vectors = _clean_vectors(actor).astype(np.float32)
    actor.vectors = vectors  # what set_global_vectors stores: the global v the round calibrates against
    start = np.ones((6, 2, 2), np.float32)
    seed = 3
    calibrated = actor.client.calibrate(vectors, start, CalibrationConfig(**CALIBRATION), seed * 1000 + 0)
    delta = calibrated.coefficients.astype(np.float64) - start
    assert np.linalg.norm(delta) > POLICY.coefficient_clip  # the clip is active in this release
    clean = start + clip_vector(delta, POLICY.coefficient_clip)
    noise = np.stack([_uploaded_coefficients(actor, start, seed) - clean for _ in range(300)])  # 300 x 24
    std = POLICY.coefficient_noise_multiplier * 2 * POLICY.coefficient_clip
    assert POLICY.coefficient_noise_std() == pytest.approx(std)
    _assert_gaussian(noise, std, rel=0.05)


def test_noise_comes_from_os_entropy_not_the_run_seed(deep_llama, task_dir):
    """Two clients built alike after the same global seeding, asked with the same round seed, add different noise.

    A noise stream derived from the run's seed (which the server chooses and records) would let the server
    regenerate it and subtract it; the clients' draws must not be reproducible from anything the server knows.
    """
    import random

    def seeded_actor():
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        return _actor(deep_llama, task_dir, client_id=1)

    first, second = seeded_actor(), seeded_actor()
    clean = _clean_vectors(first)
    np.testing.assert_array_equal(clean, _clean_vectors(second))  # same model, data and clip: same v_k
    a, b = _uploaded_vectors(first) - clean, _uploaded_vectors(second) - clean
    assert not np.allclose(a, b)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.15

    start = np.ones((6, 2, 2), np.float32)
    first.vectors = second.vectors = clean.astype(np.float32)
    random.seed(0)
    np.random.seed(0)
    c1 = _uploaded_coefficients(first, start, seed=7)
    random.seed(0)
    np.random.seed(0)
    c2 = _uploaded_coefficients(second, start, seed=7)
    assert not np.allclose(c1, c2)  # same round seed (same local calibration), different noise
    # without noise the same seed gives the same Λ: the difference above is the noise alone
    quiet = [_actor(deep_llama, task_dir, ClientPrivacy(), client_id=1) for _ in range(2)]
    for actor in quiet:
        actor.vectors = clean.astype(np.float32)
    np.testing.assert_allclose(*(_uploaded_coefficients(q, start, seed=7) for q in quiet), rtol=0, atol=1e-6)


def test_a_client_refuses_noisy_releases_beyond_the_budget_its_noise_was_calibrated_for(llama_dir, task_dir):
    """A server asking the same client again and again could average its DP noise away: one vector release
    and one Λ release per round (here 2) are what the noise covers; the next request is refused."""
    from ifedicl.federation_job import wire
    from ifedicl.kernel.errors import FederationError
    from ifedicl.model_patches.injection import initial_coefficients

    policy = PrivacySettings(vector_epsilon=1.0, coefficient_epsilon=2.0).client_policy(rounds=2)
    assert (policy.vector_releases, policy.coefficient_releases) == (1, 2)
    actor = _actor(llama_dir, task_dir, policy)
    extract = wire.encode({}, batch_size=8)
    vectors = wire.decode(actor.extract(extract))[0]["vectors"]
    with pytest.raises(FederationError, match="budget covers 1 release"):
        actor.extract(extract)
    actor.set_global_vectors(wire.encode({"vectors": vectors}))
    start = initial_coefficients(vectors.shape[0]).numpy()
    calibrate = wire.encode({"coefficients": start}, seed=1, config=CALIBRATION)
    for _ in range(2):
        actor.calibrate(calibrate)
    with pytest.raises(FederationError, match="budget covers 2 release"):
        actor.calibrate(calibrate)
    plain = _actor(llama_dir, task_dir, ClientPrivacy())  # no DP: no budget to spend
    for _ in range(3):
        plain.extract(extract)


def test_epsilon_counts_every_release_the_server_received_not_only_the_used_ones():
    """A client whose two Λ uploads were both rejected still released them: ε is spent over two rounds."""
    from ifedicl.federation_job.run_summary import privacy_summary
    from ifedicl.storage.records import RoundRecord

    settings = FederationSettings(
        clients=2, rounds=2, privacy=PrivacySettings(coefficient_epsilon=2.0), stage2="local-steps"
    )
    policy = settings.privacy.client_policy(settings.rounds)
    rounds = [RoundRecord(r, [0, 1], [1] if r == 1 else [], {0: "rejected update"}, None, [], [], 0.0)
              for r in range(3)]  # fmt: skip
    used_only = privacy_summary(rounds, settings, policy, None)["coefficients"]
    released = privacy_summary(rounds, settings, policy, {0: 2, 1: 1})["coefficients"]
    assert used_only["rounds"] == 1 and released["rounds"] == 2
    assert released["epsilon"] > used_only["epsilon"]
