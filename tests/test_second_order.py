"""The second-order round (issue 30, candidate 4): the clients' statistics are the label-only loss's gradient
and Gauss-Newton matrix (checked against an independent per-example Jacobian), the trust-region step, bad
uploads rejected and recorded, and a real federation with --stage2 gauss-newton (Ray, LanceDB, a tiny model)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ifedicl.federation_job.client import Client
from ifedicl.federation_job.federation_settings import build_strategies
from ifedicl.federation_job.options import FederationOptions, resolve_curvature
from ifedicl.federation_job.second_order import (
    CurvatureStats,
    TrustRegionNewton,
    TrustRegionSettings,
    TrustRegionState,
    checked_rows,
    curvature_rows,
    curvature_stats,
    stats_size,
    trust_region_step,
    trust_region_trace,
)
from ifedicl.federation_job.strategies import ClientUpdate, FedAvg, RoundId
from ifedicl.kernel.data import Split, load_task_dir
from ifedicl.kernel.errors import FederationError, IfediclError
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.kernel.sources import DataSource
from ifedicl.kernel.task import TaskSpec
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import label_logits
from ifedicl.model_patches.injection import InjectionTables, initial_coefficients
from ifedicl.storage.store import Store

P = 8  # a Λ of shape [2, 2, 2] in the server-side tests


def _client(llama_dir, task_dir, classes: int, n: int = 6) -> Client:
    data = load_task_dir(task_dir)
    task = data.task
    split = data.train.head(n)
    if classes == 3:  # the demo task is binary: a 3-class task over the same texts tests C - 1 = 2 backward passes
        task = TaskSpec("three-way", task.template, (*task.labels, "neutral"))
        split = Split(split.texts, [i % 3 for i in range(n)])
    return Client(HFContextModel(load_model(str(llama_dir))), load_tokenizer(str(llama_dir)), task, split)


def _reference_stats(client: Client, vectors: np.ndarray, coefficients: np.ndarray) -> tuple[float, np.ndarray, ...]:
    """Mean loss, gradient and J^T H J computed one example at a time with torch's full Jacobian of all C logits."""
    vec = torch.as_tensor(vectors)
    gradient, curvature, loss = 0.0, 0.0, 0.0
    for text, label in zip(client.data.texts, client.data.labels):
        prompt = [client.task.prompt(text)]

        def logits_of(flat: torch.Tensor, prompt=prompt) -> torch.Tensor:
            tables = InjectionTables.build([vec], [flat.reshape(coefficients.shape)])
            row = torch.ones(1, dtype=torch.long)
            return label_logits(client.ctx, client.tokenizer, prompt, client.label_ids, tables, row)[1][0]

        flat = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
        jacobian = torch.autograd.functional.jacobian(logits_of, flat).double()  # [C, P]
        z = logits_of(flat).detach().double()
        p = torch.softmax(z, -1)
        loss += float(-torch.log_softmax(z, -1)[label])
        gradient = gradient + jacobian.T @ (p - torch.nn.functional.one_hot(torch.tensor(label), len(p)).double())
        curvature = curvature + jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
    n = len(client.data)
    return loss / n, (gradient / n).numpy(), (curvature / n).numpy()


@pytest.mark.parametrize("classes", [2, 3])
def test_the_clients_statistics_are_the_label_only_losss_gradient_and_gauss_newton_matrix(llama_dir, task_dir, classes):
    client = _client(llama_dir, task_dir, classes)
    vectors = client.extract_vectors(batch_size=8)
    start = initial_coefficients(client.ctx.num_layers).numpy()
    moved = start + np.random.default_rng(0).normal(0, 0.05, start.shape).astype(np.float32)
    stats = curvature_stats(client, vectors, moved, list(range(len(client.data))), previous=start, batch_size=4)
    ragged = curvature_stats(client, vectors, moved, list(range(len(client.data))), previous=start, batch_size=5)
    np.testing.assert_allclose(ragged.pack(), stats.pack(), rtol=1e-5, atol=1e-8)  # a last batch of one example
    loss, gradient, curvature = _reference_stats(client, vectors, moved)
    assert stats.loss == pytest.approx(loss, rel=1e-4)
    np.testing.assert_allclose(stats.gradient, gradient, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(stats.curvature, curvature, rtol=1e-3, atol=1e-6)
    assert stats.previous_loss == pytest.approx(client.evaluate_loss(vectors, start, objective="label-only"), rel=1e-4)
    back = CurvatureStats.unpack(stats.pack(), start.size)  # the upload carries the upper triangle only
    np.testing.assert_allclose(back.curvature, stats.curvature, rtol=1e-12)
    back.check()
    # the loss check on half the rows: the window's loss plus those rows' paired difference; the rest unchanged
    rows = list(range(len(client.data)))
    half = curvature_stats(client, vectors, moved, rows, previous=start, batch_size=4, seed=3, check_fraction=0.5)
    checked = checked_rows(rows, 0.5, 3)
    assert len(checked) == 3 and set(checked) < set(rows)
    paired = client.evaluate_loss(vectors, start, rows=checked) - client.evaluate_loss(vectors, moved, rows=checked)
    assert half.previous_loss == pytest.approx(stats.loss + paired, rel=1e-4)
    np.testing.assert_allclose(half.pack()[2:], stats.pack()[2:], rtol=1e-6, atol=1e-9)
    assert half.loss == pytest.approx(stats.loss, rel=1e-6)
    # spread: the same statistics plus n × the variance of the paired mean, from the rows' own differences
    spread = curvature_stats(client, vectors, moved, rows, start, 4, seed=3, check_fraction=0.5, spread=True)
    one_row = [client.evaluate_loss(vectors, start, rows=[i]) - client.evaluate_loss(vectors, moved, rows=[i])
               for i in checked]  # fmt: skip
    assert spread.decrease_variance == pytest.approx(len(rows) * np.var(one_row, ddof=1) / len(checked), rel=1e-3)
    packed = spread.pack()
    assert packed.shape == (stats_size(start.size, spread=True),)
    np.testing.assert_allclose(packed[:-1], half.pack(), rtol=1e-9)
    assert CurvatureStats.unpack(packed, start.size, spread=True).decrease_variance == spread.decrease_variance


def _three_class_window(llama_dir, task_dir) -> tuple[Client, np.ndarray, np.ndarray, list[int], CurvatureStats]:
    """A three-class client, its vectors, a Λ moved off the start, its rows and their exact statistics there."""
    client = _client(llama_dir, task_dir, classes=3)
    vectors = client.extract_vectors(batch_size=8)
    start = initial_coefficients(client.ctx.num_layers).numpy()
    moved = start + np.random.default_rng(0).normal(0, 0.05, start.shape).astype(np.float32)
    rows = list(range(len(client.data)))
    exact = curvature_stats(client, vectors, moved, rows, batch_size=6)
    return client, vectors, moved, rows, exact


def test_the_sampled_curvature_has_the_exact_gradient_and_estimates_the_gauss_newton_matrix_unbiased(
    llama_dir, task_dir
):
    """Three classes: ``sampled`` (two backward passes) gives the exact gradient every time, and its matrix
    averaged over many draws approaches the exact JᵀHJ (a fixed set of seeds: a deterministic check)."""
    client, vectors, moved, rows, exact = _three_class_window(llama_dir, task_dir)
    draws = [
        curvature_stats(client, vectors, moved, rows, batch_size=6, curvature="sampled", seed=seed)
        for seed in range(200)
    ]
    for drawn in draws[:3]:
        np.testing.assert_allclose(drawn.gradient, exact.gradient, rtol=1e-5, atol=1e-8)
        drawn.check()
    # each row's label is drawn from the round's seed in the rows' order, whatever batch it lands in
    rebatched = curvature_stats(client, vectors, moved, rows, batch_size=4, curvature="sampled", seed=0)
    np.testing.assert_allclose(rebatched.curvature, draws[0].curvature, rtol=1e-5, atol=1e-8)
    mean = np.mean([d.curvature for d in draws], axis=0)
    error = np.linalg.norm(mean - exact.curvature) / np.linalg.norm(exact.curvature)
    single = np.linalg.norm(draws[0].curvature - exact.curvature) / np.linalg.norm(exact.curvature)
    assert error < 0.15 and error < single / 4  # the mean of 200 draws is close, far closer than one draw
    with pytest.raises(FederationError, match="curvature must be one of"):
        curvature_stats(client, vectors, moved, rows, curvature="diagonal")


def test_the_empirical_curvature_is_the_exact_gradient_and_the_sum_of_the_examples_gradients_outer_products(
    llama_dir, task_dir
):
    """Three classes: ``empirical`` (the gradient's one backward pass) gives the exact gradient and, as its
    matrix, the mean of gᵢgᵢᵀ over the examples, each gᵢ the exact statistics' gradient on that example alone;
    it is not the Gauss-Newton matrix (the true label's residual in place of H)."""
    client, vectors, moved, rows, exact = _three_class_window(llama_dir, task_dir)
    empirical = curvature_stats(client, vectors, moved, rows, batch_size=6, curvature="empirical")
    np.testing.assert_allclose(empirical.gradient, exact.gradient, rtol=1e-5, atol=1e-8)
    assert empirical.loss == pytest.approx(exact.loss, rel=1e-9)
    alone = [curvature_stats(client, vectors, moved, [i], curvature="exact").gradient for i in rows]  # gᵢ
    outer = np.mean([np.outer(g, g) for g in alone], axis=0)
    np.testing.assert_allclose(empirical.curvature, outer, rtol=1e-4, atol=1e-7 * np.abs(outer).max())
    empirical.check()
    assert np.linalg.norm(empirical.curvature - exact.curvature) > 0.05 * np.linalg.norm(exact.curvature)


def test_a_rows_drawn_label_is_the_one_torch_multinomial_drew_for_it_in_the_rows_order():
    """Rounds drew labels batch by batch with ``torch.multinomial`` before batches were sorted by length; the
    per-row draws consume the seed's stream in the rows' order the same way, so those runs keep their draws."""
    from ifedicl.federation_job.second_order import _drawn_labels, _label_noise

    probs = torch.softmax(torch.randn(10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    stream = torch.Generator().manual_seed(9)
    by_batch = torch.cat([torch.multinomial(probs[s : s + 4].float(), 1, generator=stream).squeeze(1)
                          for s in range(0, 10, 4)])  # fmt: skip
    noise = _label_noise(list(range(100, 110)), 6, seed=9)  # row ids, not positions
    reordered = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    drawn = _drawn_labels(probs[reordered], torch.stack([noise[100 + k] for k in reordered]))
    assert drawn.tolist() == by_batch[reordered].tolist()


def test_the_curvature_on_a_fraction_of_the_rows_is_their_matrix_beside_every_rows_gradient(llama_dir, task_dir):
    """``curvature_fraction``: the gradient and loss of the whole window (one backward pass for the rows without
    the matrix), the Gauss-Newton matrix of the seeded :func:`curvature_rows` alone, as their own window would
    give it; a binary exact matrix is every row's whatever the fraction (it comes with the gradient's pass)."""
    client = _client(llama_dir, task_dir, classes=3)
    vectors = client.extract_vectors(batch_size=8)
    start = initial_coefficients(client.ctx.num_layers).numpy()
    moved = start + np.random.default_rng(0).normal(0, 0.05, start.shape).astype(np.float32)
    rows = list(range(len(client.data)))
    whole = curvature_stats(client, vectors, moved, rows, batch_size=4, seed=5)
    part = curvature_stats(client, vectors, moved, rows, batch_size=4, seed=5, curvature_fraction=0.25)
    chosen = curvature_rows(rows, 0.25, 5)
    assert len(chosen) == math.ceil(0.25 * len(rows)) and chosen != checked_rows(rows, 0.25, 5)
    alone = curvature_stats(client, vectors, moved, chosen, batch_size=4, seed=5)
    assert part.loss == pytest.approx(whole.loss, rel=1e-6)  # other batches: float32 rounding apart
    np.testing.assert_allclose(part.gradient, whole.gradient, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(part.curvature, alone.curvature, rtol=1e-5, atol=1e-8)
    assert not np.allclose(part.curvature, whole.curvature, rtol=1e-3)
    part.check()

    binary = _client(llama_dir, task_dir, classes=2)
    binary_vectors = binary.extract_vectors(batch_size=8)
    binary_rows = list(range(len(binary.data)))
    every = curvature_stats(binary, binary_vectors, moved, binary_rows, batch_size=4)
    quarter = curvature_stats(binary, binary_vectors, moved, binary_rows, batch_size=4, curvature_fraction=0.25)
    np.testing.assert_allclose(quarter.curvature, every.curvature, rtol=1e-9)
    with pytest.raises(FederationError, match="curvature's fraction must be in"):
        curvature_stats(client, vectors, moved, rows, curvature_fraction=0)


def test_the_trust_region_step_is_newtons_inside_and_on_the_boundary_outside():
    rng = np.random.default_rng(1)
    root = rng.normal(size=(P, P))
    curvature = root @ root.T + 0.1 * np.eye(P)
    gradient = rng.normal(size=P)
    newton = -np.linalg.solve(curvature, gradient)
    np.testing.assert_allclose(trust_region_step(gradient, curvature, 10 * np.linalg.norm(newton)), newton, rtol=1e-6)
    short = trust_region_step(gradient, curvature, 0.1 * np.linalg.norm(newton))
    assert np.linalg.norm(short) == pytest.approx(0.1 * np.linalg.norm(newton), rel=1e-6)
    assert gradient @ short + 0.5 * short @ curvature @ short < 0  # the model's value goes down
    flat = trust_region_step(gradient, np.zeros((P, P)), 0.5)  # no curvature: steepest descent to the boundary
    np.testing.assert_allclose(flat, -0.5 * gradient / np.linalg.norm(gradient), rtol=1e-6)



def test_the_ridge_damps_the_flat_directions_and_keeps_the_steep_ones():
    """``--step-ridge r``: inside the radius the step is -(G + μI)⁻¹g with μ = r·tr(G)/P, so a direction of
    eigenvalue e moves by g/(e + μ): a flat one (e ≪ μ) by at most g/μ instead of g/e, a steep one (e ≫ μ) nearly
    as far as Newton's step; r = 0 is the plain step, and at the boundary the step still fills the radius."""
    eigenvalues = np.array([1e-2, 3e-2, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # two nearly flat directions
    basis, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(P, P)))
    curvature = basis @ np.diag(eigenvalues) @ basis.T
    gradient = basis @ np.full(P, 0.1)  # the same pull along every eigenvector
    newton = -np.linalg.solve(curvature, gradient)
    far = 10 * np.linalg.norm(newton)
    np.testing.assert_allclose(trust_region_step(gradient, curvature, far, ridge=0.0), newton, rtol=1e-5)  # 1e-9 floor
    ridge = 0.1
    mu = ridge * eigenvalues.mean()  # 0.79
    damped = trust_region_step(gradient, curvature, far, ridge=ridge)
    np.testing.assert_allclose(damped, -np.linalg.solve(curvature + mu * np.eye(P), gradient), rtol=1e-9)
    along = basis.T @ damped  # [P] the step along each eigenvector
    assert np.all(np.abs(along[:2]) <= 0.1 / mu)  # flat: 0.13 at most, where Newton moves 10 and 3.3
    np.testing.assert_allclose(np.abs(along[-1]), 0.1 / (32 + mu), rtol=1e-9)  # steep: within 3% of Newton's
    assert abs((basis.T @ newton)[-1]) / abs(along[-1]) < 1.03
    boundary = trust_region_step(gradient, curvature, 0.05, ridge=ridge)  # shorter than the damped step: fills it
    assert np.linalg.norm(boundary) == pytest.approx(0.05, rel=1e-6)


def _upload(cid: int, curvature: np.ndarray, gradient: np.ndarray, loss: float = 0.5, previous: float = 0.0):
    stats = CurvatureStats(loss, previous, gradient, curvature)
    return ClientUpdate(cid, stats.pack().astype(np.float32), 10, loss)


def test_a_curvature_upload_that_is_not_psd_or_not_finite_is_rejected_and_the_round_goes_on():
    from ifedicl.federation_job import wire

    newton = TrustRegionNewton(FedAvg(weighted=True))
    good = _upload(0, np.eye(P), np.ones(P))
    indefinite = _upload(1, -np.eye(P), np.ones(P))
    negative_loss = _upload(2, np.eye(P), np.ones(P), loss=-1.0)
    uploads = (good, indefinite, negative_loss)
    answers = {u.client_id: wire.encode({"curvature": u.values}, num_examples=10) for u in uploads}
    nan = good.values.copy()
    nan[5] = np.nan
    answers[3] = wire.encode({"curvature": nan}, num_examples=10)
    answers[4] = wire.encode({"curvature": good.values[:-1]}, num_examples=10)  # a size that fits no Λ
    updates, rejected = newton.decode(answers, "curvature", (stats_size(P),))
    assert [u.client_id for u in updates] == [0]
    assert "positive semi-definite" in rejected[1] and "negative loss" in rejected[2]
    assert "non-finite" in rejected[3] and "shape" in rejected[4]
    start = np.zeros((2, 2, 2), np.float32)
    value = newton.aggregate(RoundId("calibrate", 1, "round 1"), updates, reference=start).value
    assert value.shape == (2, 2, 2) and np.all(np.isfinite(value))


def test_a_step_that_raised_the_pooled_loss_is_taken_back_with_a_smaller_radius():
    """Round 1 steps from Λ0; round 2's clients say the loss at the new Λ is above the loss at Λ0 on the same
    examples: round 2 starts again from Λ0, with the stored g and G, inside a quarter of the radius."""
    newton = TrustRegionNewton(FedAvg(weighted=True))
    reference = np.zeros((2, 2, 2), np.float32)
    gradient = np.linspace(-1, 1, P)
    first = newton.aggregate(RoundId("calibrate", 1, "r1"), [_upload(0, 0.01 * np.eye(P), gradient)], reference).value
    assert np.linalg.norm(first) == pytest.approx(0.5, rel=1e-5)  # the initial radius
    assert newton.state.measured is None  # nothing measured yet
    predicted = newton.state.predicted
    worse = [_upload(0, np.eye(P), np.ones(P), loss=0.9, previous=0.5)]
    second = newton.aggregate(RoundId("calibrate", 2, "r2"), worse, first).value
    assert newton.state.measured == pytest.approx((-0.4 / predicted, -0.4 / predicted))  # ρ < 0 (no confidence)
    np.testing.assert_allclose(newton.state.accepted, reference)
    assert np.linalg.norm(second) == pytest.approx(0.125, rel=1e-5)
    assert np.allclose(second / np.linalg.norm(second), first / np.linalg.norm(first), atol=1e-5)  # same g, G
    better = [_upload(0, np.eye(P), np.ones(P), loss=0.1, previous=0.5)]  # far better than predicted: accepted
    newton.aggregate(RoundId("calibrate", 3, "r3"), better, second)
    np.testing.assert_allclose(newton.state.accepted, second)
    resumed = TrustRegionNewton(FedAvg(weighted=True))
    resumed.resume(newton.state_arrays(), (2, 2, 2))
    assert resumed.state.radius == newton.state.radius and resumed.state.measured == newton.state.measured
    level = [_upload(0, np.eye(P), np.zeros(P), loss=0.1, previous=0.5)]  # accepted, and no gradient left
    flat = newton.aggregate(RoundId("calibrate", 4, "r4"), level, second).value
    assert newton.state.measured is not None and newton.state.predicted == 0  # a zero gradient: no step
    newton.aggregate(RoundId("calibrate", 5, "r5"), [_upload(0, np.eye(P), np.ones(P))], flat)
    assert newton.state.measured is None  # nothing was predicted, so round 5 measured nothing
    older = {k: v for k, v in newton.state_arrays().items() if k != "measured"}  # stored before ρ was kept
    resumed.resume(older, (2, 2, 2))
    assert resumed.state.measured is None and resumed.state.radius == newton.state.radius
    with pytest.raises(FederationError, match="trust-region state"):
        resumed.resume({**newton.state_arrays(), "curvature": np.zeros((3, 3))}, (2, 2, 2))


def test_curvature_memory_sums_the_rounds_models_recentred_at_the_current_coefficients():
    """On a quadratic loss every window's model is exact, so the decayed sum re-centred at any Λ has the loss's
    own gradient and curvature wherever each window's statistics were taken; the newest window weighs 1, the
    one before γ; and the sum is part of the stored state, resumed as it was."""
    rng = np.random.default_rng(0)
    root, mixing = rng.normal(size=P), rng.normal(size=(P, P))
    hessian = mixing @ mixing.T + np.eye(P)
    state = TrustRegionState(0.5)
    for _ in range(3):
        point = rng.normal(size=P)
        state.remember(CurvatureStats(1.0, 0.0, hessian @ (point - root), hessian), point.reshape(2, 2, 2), 0.5)
    at = rng.normal(size=P)
    gradient, curvature = state.remembered(at.reshape(2, 2, 2))
    np.testing.assert_allclose(gradient, hessian @ (at - root), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(curvature, hessian, rtol=1e-12)
    decayed = TrustRegionState(0.5)
    for scale in (1.0, 3.0):
        decayed.remember(CurvatureStats(1.0, 0.0, np.zeros(P), scale * np.eye(P)), np.zeros((2, 2, 2)), 0.5)
    np.testing.assert_allclose(decayed.remembered(np.zeros(P))[1], (0.5 * 1 + 3) / 1.5 * np.eye(P))
    resumed = TrustRegionState.from_arrays(state.to_arrays(), (2, 2, 2))
    np.testing.assert_allclose(resumed.remembered(at)[0], gradient)
    with pytest.raises(FederationError, match="trust-region state has fields"):
        TrustRegionState.from_arrays({k: v for k, v in state.to_arrays().items() if k != "offset"}, (2, 2, 2))


def test_with_memory_the_step_follows_every_window_not_the_last_one():
    """Two windows disagree (gradients +1 and -1 at the same Λ): without memory round 2 steps along the second
    window's gradient; with memory 0.9 along their weighted sum, a tenth as long in the same direction."""
    reference = np.zeros((2, 2, 2), np.float32)
    steps = {}
    for memory in (0.0, 0.9):
        newton = TrustRegionNewton(FedAvg(weighted=True), TrustRegionSettings(radius=100.0, memory=memory))
        newton.aggregate(RoundId("calibrate", 1, "r1"), [_upload(0, np.eye(P), np.ones(P))], reference)
        newton.state.accepted, newton.state.predicted = None, 0.0  # the same start again: no ratio test
        second = [_upload(0, np.eye(P), -np.ones(P))]
        steps[memory] = newton.aggregate(RoundId("calibrate", 2, "r2"), second, reference).value.reshape(-1)
    np.testing.assert_allclose(steps[0.0], np.ones(P), rtol=1e-5)  # Newton on window 2 alone: -G⁻¹g
    np.testing.assert_allclose(steps[0.9], (1 - 0.9) / 1.9 * np.ones(P), rtol=1e-5)



def test_an_undone_steps_window_stays_out_of_the_memory_when_asked():
    """Round 2's clients measure the loss at round 1's step as worse, and their statistics there are wild (a far
    point of another curvature). The step is undone either way; with ``remember_undone`` (the report's cells) that
    window joins the memory and sets the retry's direction, without it the retry is round 1's model alone: the
    same direction inside a quarter of the radius, and the memory's weight is still round 1's."""
    reference = np.zeros((2, 2, 2), np.float32)
    gradient = np.linspace(-1, 1, P)
    wild = [_upload(0, 1e3 * np.eye(P), 1e3 * np.ones(P), loss=0.9, previous=0.5)]
    retries = {}
    for remember in (True, False):
        settings = TrustRegionSettings(memory=0.5, remember_undone=remember)
        newton = TrustRegionNewton(FedAvg(weighted=True), settings)
        first = newton.aggregate(RoundId("calibrate", 1, "r1"), [_upload(0, 0.01 * np.eye(P), gradient)], reference)
        retries[remember] = newton.aggregate(RoundId("calibrate", 2, "r2"), wild, first.value).value.reshape(-1)
        np.testing.assert_allclose(newton.state.accepted, reference)  # undone either way
        assert newton.state.weight == (1.5 if remember else 1.0)
        assert np.linalg.norm(retries[remember]) == pytest.approx(0.125, rel=1e-5)
    direction = -gradient / np.linalg.norm(gradient)  # round 1's model: G ∝ I, so along -g
    np.testing.assert_allclose(retries[False] / 0.125, direction, atol=1e-5)
    assert retries[True] @ direction / 0.125 < 0.5  # the wild window's all-ones gradient dominates instead


def _quadratic_upload(hessian: np.ndarray, root: np.ndarray, at: np.ndarray, previous: np.ndarray | None = None):
    """A client's exact statistics at ``at`` of the loss ½(Λ - root)ᵀH(Λ - root) + 0.1, with the loss at
    ``previous`` as the loss check measures it."""
    loss = lambda x: 0.5 * (x - root) @ hessian @ (x - root) + 0.1  # noqa: E731
    before = 0.0 if previous is None else loss(previous.reshape(-1))
    return _upload(0, hessian, hessian @ (at.reshape(-1) - root), loss=loss(at.reshape(-1)), previous=before)


def test_the_model_step_check_needs_no_forward_at_the_previous_coefficients_and_agrees_on_a_quadratic():
    """On a quadratic loss the model check reads the decrease the loss check measures, so both take the same
    rounds; its requests carry no previous Λ (the clients' extra forward pass is gone)."""
    rng = np.random.default_rng(1)
    root, mixing = rng.normal(size=P), rng.normal(size=(P, P))
    hessian = mixing @ mixing.T + np.eye(P)
    runs = {}
    for check in ("loss", "model"):
        newton = TrustRegionNewton(FedAvg(weighted=True), TrustRegionSettings(radius=0.3, step_check=check))
        at, path = np.zeros((2, 2, 2)), []
        for r in range(1, 5):
            request = newton.round_upload(at.astype(np.float32))
            assert ("previous" in request.extra) == (check == "loss" and r > 1)
            upload = _quadratic_upload(hessian, root, at, newton.state.accepted if check == "loss" else None)
            at = newton.aggregate(RoundId("calibrate", r, f"r{r}"), [upload], at.astype(np.float32)).value
            path.append((at.copy(), newton.state.radius))
        runs[check] = path
    for (loss_at, loss_radius), (model_at, model_radius) in zip(runs["loss"], runs["model"], strict=True):
        np.testing.assert_allclose(model_at, loss_at, rtol=1e-4, atol=1e-5)
        assert model_radius == loss_radius
    assert runs["model"][-1][1] > 0.3  # steps the model predicted well grew the radius


def test_the_loss_check_on_a_fraction_is_asked_for_only_when_there_is_a_step_to_check():
    newton = TrustRegionNewton(FedAvg(weighted=True), TrustRegionSettings(check_fraction=0.25))
    at = np.zeros((2, 2, 2), np.float32)
    assert "check_fraction" not in newton.round_upload(at).meta  # round 1: no previous Λ, nothing to check
    newton.aggregate(RoundId("calibrate", 1, "r1"), [_upload(0, np.eye(P), np.ones(P))], at)
    request = newton.round_upload(at)
    assert request.meta["check_fraction"] == 0.25 and "previous" in request.extra
    assert "check_fraction" not in TrustRegionNewton(FedAvg()).round_upload(at).meta  # every row: as before


def _measured(cid: int, examples: int, decrease: float, variance: float) -> ClientUpdate:
    """A client's round-2 upload: the loss fell by ``decrease`` on its checked rows, with that measurement's
    variance ``variance`` (uploaded times the client's example count, as curvature_stats does)."""
    stats = CurvatureStats(0.5, 0.5 + decrease, np.ones(P), np.eye(P), examples * variance)
    return ClientUpdate(cid, stats.pack().astype(np.float32), examples, 0.5)


@pytest.mark.parametrize(
    ("decrease_of_predicted", "error_of_predicted", "confidence", "outcome"),
    [
        (0.1, 0.5, 0.0, "shrunk"),  # ρ = 0.1: the classic rule quarters the radius
        (0.1, 0.5, 1.0, "kept"),  # ... but 0.1 + 1 s.e. = 0.6 ≥ ¼: not evidence that the model was poor
        (0.1, 0.1, 1.0, "shrunk"),  # 0.1 + 0.1 < ¼: it was
        (-0.5, 0.2, 1.0, "rejected"),  # the loss rose, 2.5 s.e. clear of 0: the step is undone
        (-0.5, 0.8, 1.0, "kept"),  # within 1 s.e. of no change (and of ¼): neither undone nor shrunk
    ],
)
def test_with_a_confidence_the_trust_region_shrinks_or_undoes_a_step_only_on_evidence(
    decrease_of_predicted, error_of_predicted, confidence, outcome
):
    """The measured decrease over the last step comes with its standard error (pooled from two clients of 10 and
    30 examples: Σ(nₖ/N)²·varₖ); the radius is quartered only if ρ's upper bound is under ¼, the step undone only
    if it is under 0. Confidence 0 is the classic rule."""
    settings = TrustRegionSettings(check_fraction=0.25, confidence=confidence)
    newton = TrustRegionNewton(FedAvg(weighted=True), settings)
    reference = np.zeros((2, 2, 2), np.float32)
    spread = confidence > 0
    assert newton.round_upload(reference).shape == (stats_size(P, spread),)
    assert newton.round_upload(reference).meta.get("spread", False) == spread
    round_one = CurvatureStats(0.5, 0.0, np.linspace(-1, 1, P), 0.01 * np.eye(P), 0.0 if spread else None)
    first = newton.aggregate(
        RoundId("calibrate", 1, "r1"), [ClientUpdate(0, round_one.pack().astype(np.float32), 10, 0.5)], reference
    ).value
    predicted = newton.state.predicted
    error = error_of_predicted * predicted  # the pooled s.e. wanted: each client's variance gives it
    variance = error**2 / ((10 / 40) ** 2 + (30 / 40) ** 2)  # the same varₖ at both clients
    decrease = decrease_of_predicted * predicted
    uploads = [_measured(0, 10, decrease, variance), _measured(1, 30, decrease, variance)]
    if not spread:
        uploads = [ClientUpdate(u.client_id, u.values[:-1], u.num_examples, u.loss) for u in uploads]
    newton.aggregate(RoundId("calibrate", 2, "r2"), uploads, first)
    undone = outcome == "rejected"  # the next step starts again from round 1's start
    np.testing.assert_allclose(newton.state.accepted, reference if undone else first, atol=1e-7)
    assert newton.state.radius == pytest.approx(0.5 if outcome == "kept" else 0.125, rel=1e-6)


def test_an_upload_with_a_negative_variance_is_rejected_by_name():
    newton = TrustRegionNewton(FedAvg(weighted=True), TrustRegionSettings(confidence=1.0))
    from ifedicl.federation_job import wire

    answers = {0: wire.encode({"curvature": _measured(0, 10, 0.1, 0.01).values}, num_examples=10),
               1: wire.encode({"curvature": _measured(1, 10, 0.1, -0.01).values}, num_examples=10)}  # fmt: skip
    updates, rejected = newton.decode(answers, "curvature", (stats_size(P, spread=True),))
    assert [u.client_id for u in updates] == [0] and "negative variance" in rejected[1]


def test_the_model_step_check_takes_back_a_step_whose_new_gradient_says_it_overshot():
    """Round 2's statistics at the new Λ: the gradient points back along the step, steeply (the loss curved up
    far more than round 1's model said), so the decrease read from them is negative: rejected, radius / 4."""
    newton = TrustRegionNewton(FedAvg(weighted=True), TrustRegionSettings(step_check="model"))
    reference = np.zeros((2, 2, 2), np.float32)
    first = newton.aggregate(RoundId("calibrate", 1, "r1"), [_upload(0, 0.01 * np.eye(P), -np.ones(P))], reference)
    step = first.value.reshape(-1)
    overshot = [_upload(0, np.eye(P), 10 * step / np.linalg.norm(step))]  # g·s > 0 and larger than ½ sᵀGs
    newton.aggregate(RoundId("calibrate", 2, "r2"), overshot, first.value)
    np.testing.assert_allclose(newton.state.accepted, reference)
    assert newton.state.radius == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"objective": "full-vocab"}, "steps on the label-only loss"),
        ({"aggregator": "median"}, "pools statistics by their mean"),
        ({"server_optimizer": "adam"}, "its own server step"),
        ({"prior_correction": True}, "--prior-correction does not apply"),
        ({"dp_coefficient_epsilon": 1.0}, "no DP noise model"),
    ],
)
def test_gauss_newton_refuses_what_it_does_not_go_with_and_names_the_way_out(fields, message):
    """The second-order round is the default: what only local steps support says to choose them, and works then."""
    with pytest.raises(IfediclError, match=message) as refused:
        FederationOptions(**fields).settings(0.5, 0).validate()
    assert "(the default)" in str(refused.value) and "with --stage2 local-steps it" in str(refused.value)
    FederationOptions(stage2="local-steps", **fields).settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match="--curvature applies to --stage2 gauss-newton"):
        FederationOptions(stage2="local-steps", curvature="sampled").settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match="--curvature-memory applies to --stage2 gauss-newton"):
        FederationOptions(stage2="local-steps", curvature_memory=0.5).settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match=r"--curvature-memory must be in \[0, 1\) \(got 1.0\)"):
        FederationOptions(curvature_memory=1.0).settings(0.5, 0).validate()
    for fields, refused in (
        ({"stage2": "local-steps", "step_check_fraction": 0.5}, "--step-check-fraction applies to --stage2"),
        ({"step_check_fraction": 0.0}, r"--step-check-fraction must be in \(0, 1\] \(got 0.0\)"),
        ({"stage2": "local-steps", "curvature_fraction": 0.5}, "--curvature-fraction applies to --stage2"),
        ({"curvature_fraction": 1.5}, r"--curvature-fraction must be in \(0, 1\] \(got 1.5\)"),
        ({"step_check": "model", "step_check_fraction": 0.5}, "it goes with --step-check loss"),
        ({"stage2": "local-steps", "step_check_confidence": 2.0}, "--step-check-confidence applies to --stage2"),
        ({"step_check_confidence": -1.0}, r"--step-check-confidence must be a finite number >= 0 \(got -1.0\)"),
        ({"step_check_confidence": float("nan")}, "--step-check-confidence must be a finite number"),
        ({"step_check": "model", "step_check_confidence": 2.0}, "it goes with --step-check loss"),
    ):
        with pytest.raises(IfediclError, match=refused):
            FederationOptions(**fields).settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match="--step-check applies to --stage2 gauss-newton"):
        FederationOptions(stage2="local-steps", step_check="model").settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match="--step-check must be one of"):
        FederationOptions(step_check="guess").settings(0.5, 0).validate()


def test_the_default_recipe_is_the_second_order_round_on_the_label_only_loss():
    """federate, recalibrate and eval share FederationOptions; the library's own defaults agree with it."""
    from ifedicl.evaluation.settings import EvalSettings
    from ifedicl.federation_job.federation_settings import FederationSettings

    for settings in (FederationOptions().settings(0.5, 0), FederationSettings()):
        settings.validate()
        assert (settings.stage2, settings.calibration.objective) == ("gauss-newton", "label-only")
    assert EvalSettings("m", ["t"]).objective_for("i2cl_central") == "label-only"


# An IFed-ICL cell's hash names the default stage 1 of fewer examples, whatever its round (test_recipe.py).
STAGE1 = {"stage1_examples": FederationOptions().stage1_examples}


def test_an_evaluation_cell_names_the_effective_stage2():
    """Cells computed before the switch (local steps, no stage2 in their settings) keep their hash; an IFed-ICL
    cell under the new default does not share it, and the methods that have no rounds of Λ ignore stage2."""
    from ifedicl.evaluation.settings import EvalSettings

    new_default = EvalSettings("m", ["t"])
    pinned = EvalSettings("m", ["t"], federation={"stage2": "local-steps"})
    explicit = EvalSettings("m", ["t"], federation={"stage2": "gauss-newton"})
    assert pinned.federation_for_hash("ifedicl") == {"vector_coding": "int8", **STAGE1}  # stage2 as before it existed
    assert new_default.cell_hash("ifedicl") == explicit.cell_hash("ifedicl") != pinned.cell_hash("ifedicl")
    for method in ("fedavg_lora", "i2cl_central", "local_calibration", "zero_shot"):
        assert new_default.cell_hash(method) == pinned.cell_hash(method)


def test_cells_of_the_every_row_check_keep_their_hash_and_the_sampled_default_gets_its_own():
    """The default trust-region test became a quarter of the rows within one standard error: a second-order cell
    computed before (every row, point test: nothing named) keeps its hash when it names that check, an IFed-ICL
    cell under the new default does not share it, and cells whose rounds do not read the loss check (local steps,
    the model check, the methods without rounds of Λ) are unchanged."""
    from ifedicl.evaluation.settings import EvalSettings
    from ifedicl.evaluation.variants import EVERY_ROW_CHECKED, EXACT_CURVATURE

    before = EvalSettings("m", ["t"], federation={"stage2": "gauss-newton"}).federation_for_hash("ifedicl")
    auto = {"curvature": "auto", "curvature_memory": None, "curvature_fraction": None}  # the rule, named
    assert before == {"stage2": "gauss-newton", "vector_coding": "int8", "step_check_fraction": 0.25,
                      "step_check_confidence": 1.0, **auto, **STAGE1}  # fmt: skip
    every_row = EvalSettings("m", ["t"], federation={"stage2": "gauss-newton", **EVERY_ROW_CHECKED,
                                                     **EXACT_CURVATURE})  # fmt: skip
    assert every_row.federation_for_hash("ifedicl") == {"stage2": "gauss-newton", "vector_coding": "int8", **STAGE1}
    assert EvalSettings("m", ["t"]).cell_hash("ifedicl") != every_row.cell_hash("ifedicl")
    # on a known task, auto is named by what it computes: exact (as every cell before auto) up to 3 classes
    binary = {"stage2": "gauss-newton", "vector_coding": "int8", "step_check_fraction": 0.25,
              "step_check_confidence": 1.0, **STAGE1}  # fmt: skip
    assert EvalSettings("m", ["t"]).federation_for_hash("ifedicl", 2) == binary
    assert EvalSettings("m", ["t"]).federation_for_hash("ifedicl", 6) == {
        **binary, "curvature": "empirical", "curvature_memory": 0.75}  # fmt: skip
    # above 4 classes a cell of the sampled matrix (auto's choice before the empirical Fisher) keeps its hash by name
    assert EvalSettings("m", ["t"], federation={"curvature": "sampled"}).federation_for_hash("ifedicl", 6) == {
        **binary, "curvature": "sampled", "curvature_memory": 0.75}  # fmt: skip
    # at 3 classes the exact matrix of a quarter of the rows with memory: a 3-class cell under every row's is stale
    assert EvalSettings("m", ["t"]).federation_for_hash("ifedicl", 3) == {
        **binary, "curvature_memory": 0.75, "curvature_fraction": 0.25}  # fmt: skip
    quarter = EvalSettings("m", ["t"], federation={"curvature": "exact", "curvature_memory": 0.75,
                                                   "curvature_fraction": 0.25})  # fmt: skip
    assert quarter.cell_hash("ifedicl", 3) == EvalSettings("m", ["t"]).cell_hash("ifedicl", 3)
    # from 4 the empirical Fisher: a 4-class cell of the quarter's exact matrix (auto's choice before) is stale, and
    # one that names the empirical Fisher is a cell of the default
    assert quarter.cell_hash("ifedicl", 4) != EvalSettings("m", ["t"]).cell_hash("ifedicl", 4)
    empirical = EvalSettings("m", ["t"], federation={"curvature": "empirical"})
    assert empirical.cell_hash("ifedicl", 4) == EvalSettings("m", ["t"]).cell_hash("ifedicl", 4)
    named = EvalSettings("m", ["t"], federation={"curvature": "exact", "curvature_memory": 0.0})
    assert named.cell_hash("ifedicl", 2) == EvalSettings("m", ["t"]).cell_hash("ifedicl", 2)
    assert named.cell_hash("ifedicl", 6) != EvalSettings("m", ["t"]).cell_hash("ifedicl", 6)
    assert named.cell_hash("ifedicl", 4) != EvalSettings("m", ["t"]).cell_hash("ifedicl", 4)
    model = EvalSettings("m", ["t"], federation={"step_check": "model"}).federation_for_hash("ifedicl")
    assert model == {"stage2": "gauss-newton", "vector_coding": "int8", "step_check": "model", **auto, **STAGE1}
    steps = EvalSettings("m", ["t"], federation={"stage2": "local-steps"})
    assert steps.federation_for_hash("ifedicl") == {"vector_coding": "int8", **STAGE1}
    assert EvalSettings("m", ["t"]).cell_hash("fedavg_lora") == every_row.cell_hash("fedavg_lora")
    # the model check takes the loss check's defaults silently, and refuses them named otherwise
    FederationOptions(step_check="model").settings(0.5, 0).validate()
    assert not TrustRegionSettings(step_check="model", confidence=1.0).spread


def test_a_stored_cell_is_found_by_what_auto_computes_on_its_task(task_dir, tmp_path):
    """The cell store reads the task's classes from its task.json: a binary cell computed with the exact curvature
    named is current under the auto default, which computes the same; a hub dataset's cell names the rule."""
    from ifedicl.evaluation.cells import CellStore, task_classes
    from ifedicl.evaluation.settings import Cell, EvalSettings

    assert task_classes(str(task_dir)) == 2 and task_classes("not/a/dir") is None
    cell = Cell("ifedicl", str(task_dir), 0.5, 0)
    named = EvalSettings("m", [str(task_dir)], federation={"curvature": "exact", "curvature_memory": 0.0})
    result = {"accuracy": 0.5, "macro_f1": 0.5, "cost": {}}
    CellStore(tmp_path, named).put(cell, "sentiment", result)
    assert CellStore(tmp_path, EvalSettings("m", [str(task_dir)])).get(cell)["accuracy"] == 0.5
    sampled = EvalSettings("m", [str(task_dir)], federation={"curvature": "sampled"})
    assert CellStore(tmp_path, sampled).get(cell) is None


def test_the_stage2_setting_builds_a_trust_region_over_a_weighted_mean():
    options = FederationOptions(curvature="sampled")
    built = build_strategies(options.settings(0.5, 0), None, 2)
    assert isinstance(built.coefficients, TrustRegionNewton) and built.coefficients.inner.weighted
    upload = built.coefficients.round_upload(np.zeros((3, 2, 2), np.float32))
    meta = {"curvature": "sampled", "spread": True}  # the default check's confidence test needs the spread
    assert (upload.method, upload.shape, upload.meta) == ("curvature", (stats_size(12, spread=True),), meta)
    assert upload.extra == {}  # no previous Λ before the first step


def test_the_first_step_is_as_long_as_the_trust_radius_asked_for():
    """``--trust-radius`` bounds round 1's step (a far minimum: the step lies on the boundary) and is the radius
    the stored state starts from; outside [min, max] radius it is refused before any round."""
    at = np.zeros((2, 2, 2), np.float32)
    stats = CurvatureStats(0.5, 0.0, 100 * np.ones(P), np.eye(P), decrease_variance=0.0)  # Newton's step: 100·√P
    far = [ClientUpdate(0, stats.pack().astype(np.float32), 10, 0.5)]  # (with the default check's spread)
    for radius in (0.5, 2.0):
        built = build_strategies(FederationOptions(trust_radius=radius).settings(0.5, 0), None, 6).coefficients
        stepped = built.aggregate(RoundId("calibrate", 1, "r1"), far, at).value
        assert np.linalg.norm(stepped) == pytest.approx(radius, rel=1e-4)
        assert TrustRegionState.from_arrays(built.state.to_arrays(), at.shape).radius == radius
    FederationOptions(trust_radius=8.0).settings(0.5, 0).validate()
    for bad in (0.0, -1.0, 9.0, float("nan")):
        with pytest.raises(IfediclError, match="--trust-radius must be in"):
            FederationOptions(trust_radius=bad).settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match="--trust-radius applies to --stage2 gauss-newton"):
        FederationOptions(stage2="local-steps", trust_radius=2.0).settings(0.5, 0).validate()


def test_step_ridge_reaches_the_round_rule_and_bad_values_are_refused():
    """``--step-ridge`` is the trust region's damping floor (its step is the ridge's, r = 0's is not);
    negative or non-finite values and a ridge under local steps are refused before any round."""
    at = np.zeros((2, 2, 2), np.float32)
    curvature = np.diag([1e-3, *[1.0] * (P - 1)])  # one flat direction
    stats = CurvatureStats(0.5, 0.0, 0.01 * np.ones(P), curvature, decrease_variance=0.0)
    upload = [ClientUpdate(0, stats.pack().astype(np.float32), 10, 0.5)]
    steps = {}
    for ridge in (0.0, 0.5):
        built = build_strategies(FederationOptions(step_ridge=ridge).settings(0.5, 0), None, 6).coefficients
        assert built.settings.ridge == ridge
        steps[ridge] = built.aggregate(RoundId("calibrate", 1, "r1"), upload, at).value.reshape(-1)
    mu = 0.5 * np.diag(curvature).mean()
    np.testing.assert_allclose(steps[0.5], -0.01 / (np.diag(curvature) + mu), rtol=1e-5)
    assert abs(steps[0.0][0]) > 10 * abs(steps[0.5][0])  # the flat direction: to the radius without the ridge
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(IfediclError, match="--step-ridge must be a finite number >= 0"):
            FederationOptions(step_ridge=bad).settings(0.5, 0).validate()
    with pytest.raises(IfediclError, match="--step-ridge applies to --stage2 gauss-newton"):
        FederationOptions(stage2="local-steps", step_ridge=0.1).settings(0.5, 0).validate()


def test_auto_curvature_is_exact_up_to_three_classes_on_a_quarter_of_the_rows_and_empirical_from_four():
    """``--curvature auto`` (the default) takes the exact matrix up to 3 classes (at most 1.25 backward passes), at
    3 on a quarter of the rows, and the empirical Fisher's one pass from 4; an estimated matrix (drawn labels,
    the empirical Fisher or a fraction of the rows) gets memory 0.75 unless one is given; what the clients are
    asked for follows."""
    choice = lambda *args: dataclasses.astuple(resolve_curvature(*args))  # noqa: E731
    assert choice("auto", None, 2) == ("exact", 0.0, 1.0)  # the binary matrix comes with the gradient's pass
    assert choice("auto", None, 3) == ("exact", 0.75, 0.25)  # at 3 classes: a quarter of the rows, with memory
    assert choice("auto", None, 4) == ("empirical", 0.75, 1.0)  # from 4: the gradient's own pass
    assert choice("auto", None, 5) == ("empirical", 0.75, 1.0)
    assert choice("auto", None, 6) == ("empirical", 0.75, 1.0)
    assert choice("auto", 0.0, 6) == ("empirical", 0.0, 1.0)  # a given memory stands
    assert choice("auto", 0.5, 3, 1.0) == ("exact", 0.5, 1.0)  # and a given fraction
    assert choice("exact", None, 6) == ("exact", 0.0, 1.0)  # an explicit exact matrix: every row unless told
    assert choice("exact", None, 6, 0.5) == ("exact", 0.75, 0.5)
    assert choice("sampled", 0.5, 2) == ("sampled", 0.5, 1.0)
    assert choice("empirical", None, 6) == ("empirical", 0.75, 1.0)  # an estimate too: memory unless told
    for classes, curvature, memory, fraction in ((2, "exact", 0.0, 1.0), (3, "exact", 0.75, 0.25),
                                                 (4, "empirical", 0.75, 1.0), (6, "empirical", 0.75, 1.0)):  # fmt: skip
        built = build_strategies(FederationOptions().settings(0.5, 0), None, classes).coefficients
        assert (built.settings.curvature, built.settings.memory) == (curvature, memory)
        assert built.settings.curvature_fraction == fraction
        meta = built.round_upload(np.zeros((3, 2, 2), np.float32)).meta
        assert meta["curvature"] == curvature and meta.get("curvature_fraction", 1.0) == fraction
    FederationOptions(curvature_memory=0.5).settings(0.5, 0).validate()
    for bad, message in (({"curvature_memory": 1.0}, "--curvature-memory must be in"),
                         ({"curvature": "diagonal"}, "--curvature must be one of")):  # fmt: skip
        with pytest.raises(IfediclError, match=message):
            FederationOptions(**bad).settings(0.5, 0).validate()


def test_a_gauss_newton_federation_runs_end_to_end_and_keeps_its_state(ray_session, llama_dir, task_dir, tmp_path):
    """Two clients, three rounds: every round's upload is the statistics frame (a few KB, not Λ), the pooled
    loss is recorded, the trust region's state is stored each round, Λ moved from its start, and the same run
    under secure aggregation (the server sees only the statistics' sum) ends at the same Λ."""
    settings = FederationOptions(
        clients=2, rounds=3, local_epochs=0.5, min_shard=4, stage2="gauss-newton", objective="label-only", actors=1,
        vector_coding="float32",  # the vectors as secure aggregation sums them, so both runs start alike
    ).settings(1.0, 0)  # fmt: skip
    from ifedicl.federation_job.driver import Federation

    source = DataSource(str(task_dir), max_train=24, max_test=8)
    result = Federation(str(llama_dir), source, str(tmp_path / "store"), settings).run()
    stage2 = [r for r in result.rounds if r.round > 0]
    assert len(stage2) == 3 and all(len(r.clients_answered) == 2 and r.mean_loss > 0 for r in stage2)
    p = result.coefficients.size
    assert all(stats_size(p) * 4 < b < stats_size(p) * 4 + 2048 for r in stage2 for b in r.bytes_up)
    round_index, state = Store(tmp_path / "store").server_state(result.run_id)
    assert round_index == 3 and state["curvature"].shape == (p, p)
    # each round's state says what bounded its step and how the step before it measured up
    trace = trust_region_trace(Store(tmp_path / "store").server_states(result.run_id))
    assert [t["round"] for t in trace] == [1, 2, 3] and trace[0]["previous_ratio"] is None
    assert all(t["previous_ratio"] is not None and t["previous_ratio_upper"] >= t["previous_ratio"] for t in trace[1:])
    assert all(0 < t["step"] <= t["radius"] * (1 + 1e-6) and t["predicted_decrease"] >= 0 for t in trace)
    assert result.summary["curvature"] == {"computed": "exact", "memory": 0.0}  # auto, on a binary task
    start = initial_coefficients(result.coefficients.shape[0]).numpy()
    assert not np.allclose(result.coefficients, start)
    # under secure aggregation the server sees only the sum of the statistics, and steps to the same Λ
    masked_settings = dataclasses.replace(settings, secagg=True, min_clients=2)
    masked = Federation(str(llama_dir), source, str(tmp_path / "masked"), masked_settings).run()
    plain_state = Store(tmp_path / "store").server_state(result.run_id, 1)[1]  # round 1's pooled statistics
    masked_state = Store(tmp_path / "masked").server_state(masked.run_id, 1)[1]
    resolution = 2.0**-24  # the masked sum's fixed point (secagg.FRACTION_BITS), on float32 uploads
    for name in ("gradient", "curvature"):
        np.testing.assert_allclose(masked_state[name], plain_state[name], rtol=1e-5, atol=4 * resolution)
    np.testing.assert_allclose(masked.coefficients, result.coefficients, atol=1e-4)
    # the model step check (no previous Λ sent), the loss check on half the rows (the fraction sent) and on every
    # row with the point test (no spread uploaded): round 1, with no step to check yet, is the same
    every_row = {"step_check_fraction": 1.0, "step_check_confidence": 0.0}
    for name, fields in (("model", {"step_check": "model"}), ("half", {"step_check_fraction": 0.5}),
                         ("every row", every_row)):  # fmt: skip
        variant = dataclasses.replace(settings, **fields)
        checked = Federation(str(llama_dir), source, str(tmp_path / name), variant).run()
        assert len([r for r in checked.rounds if r.round > 0]) == 3 and not any(r.dropped for r in checked.rounds)
        size = stats_size(p, spread=name == "half") * 4
        assert all(size < b < size + 2048 for r in checked.rounds if r.round > 0 for b in r.bytes_up)
        first = Store(tmp_path / name).coefficients_by_round(checked.run_id)[1]
        np.testing.assert_allclose(first, Store(tmp_path / "store").coefficients_by_round(result.run_id)[1], atol=1e-6)


def test_a_three_class_federation_computes_the_matrix_on_a_quarter_of_the_rows(
    ray_session, llama_dir, task_dir, tmp_path
):
    """``--curvature auto`` on 3 classes: the clients are asked for the exact matrix of a quarter of their rows
    (the request carries the fraction through the actors), the server keeps memory, the rounds complete, and the
    summary records what was computed."""
    import json

    from ifedicl.federation_job.driver import Federation

    three = tmp_path / "three-way"
    three.mkdir()
    task = json.loads((task_dir / "task.json").read_text())
    (three / "task.json").write_text(json.dumps({**task, "name": "three-way", "labels": [*task["labels"], "neutral"]}))
    for name in ("train", "test"):
        rows = [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]
        lines = [json.dumps({**row, "label": i % 3}) for i, row in enumerate(rows)]
        (three / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    settings = FederationOptions(
        clients=2, rounds=2, local_epochs=0.5, min_shard=4, actors=1, vector_coding="float32"
    ).settings(1.0, 0)
    source = DataSource(str(three), max_train=24, max_test=8)
    result = Federation(str(llama_dir), source, str(tmp_path / "store"), settings).run()
    assert result.summary["curvature"] == {"computed": "exact", "memory": 0.75, "fraction": 0.25}
    stage2 = [r for r in result.rounds if r.round > 0]
    assert len(stage2) == 2 and all(len(r.clients_answered) == 2 and not r.dropped for r in stage2)
    _, state = Store(tmp_path / "store").server_state(result.run_id)
    p = result.coefficients.size
    assert state["curvature_sum"].shape == (p, p) and np.all(np.isfinite(state["curvature_sum"]))
    assert not np.allclose(result.coefficients, initial_coefficients(result.coefficients.shape[0]).numpy())
    # the same run with every row's matrix: round 1 (the same Λ and rows) pools the same gradient, another matrix
    every_row = dataclasses.replace(settings, curvature_fraction=1.0, curvature_memory=0.75)
    full = Federation(str(llama_dir), source, str(tmp_path / "every-row"), every_row).run()
    quarter_state = Store(tmp_path / "store").server_state(result.run_id, 1)[1]
    full_state = Store(tmp_path / "every-row").server_state(full.run_id, 1)[1]
    np.testing.assert_allclose(quarter_state["gradient"], full_state["gradient"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(quarter_state["curvature"], full_state["curvature"], rtol=1e-2)


def test_tampered_curvature_uploads_are_rejected_by_name_and_the_rounds_go_on(
    ray_session, llama_dir, task_dir, tmp_path
):
    """Three clients: one flips its statistics (an uphill gradient and a negative definite matrix) and is
    rejected and recorded every round; one sends NaNs from stage 1 on: rejected there, it gets no global vectors
    and is never asked again. The honest client's statistics make every step."""
    from ifedicl.federation_job.driver import Federation

    settings = FederationOptions(
        clients=3, rounds=2, local_epochs=0.5, min_shard=4, stage2="gauss-newton", objective="label-only",
        actors=3,
    ).settings(1.0, 0)  # fmt: skip
    settings = dataclasses.replace(settings, adversaries={1: "flip", 2: "nan"})
    source = DataSource(str(task_dir), max_train=36, max_test=8)
    result = Federation(str(llama_dir), source, str(tmp_path / "store"), settings).run()
    assert result.rounds[0].dropped[2].startswith("rejected update")
    for record in (r for r in result.rounds if r.round > 0):
        assert "positive semi-definite" in record.dropped[1]
        assert record.clients_sampled == [0, 1] and record.clients_answered == [0]  # answered: used
    assert np.all(np.isfinite(result.coefficients))
