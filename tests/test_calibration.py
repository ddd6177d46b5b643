"""Local calibration trains only Λ and lowers the training loss; batching does not change the math."""

import numpy as np
import pytest
import torch

from ifedicl.federation_job.client import CalibrationConfig, Client, warmup_cosine
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.injection import initial_coefficients


def _client(llama_dir, task_dir, n=24):
    data = load_task_dir(task_dir)
    ctx = HFContextModel(load_model(str(llama_dir)))
    return Client(ctx, load_tokenizer(str(llama_dir)), data.task, data.train.head(n))


def test_calibration_lowers_training_loss_and_keeps_llm_frozen(llama_dir, task_dir):
    client = _client(llama_dir, task_dir)
    before_params = [p.clone() for p in client.ctx.model.parameters()]
    vectors = client.extract_vectors(batch_size=8)
    start = initial_coefficients(client.ctx.num_layers).numpy()
    loss_before = client.evaluate_loss(vectors, start)
    result = client.calibrate(vectors, start, CalibrationConfig(epochs=4, noise_scale=0.0), seed=0)
    loss_after = client.evaluate_loss(vectors, result.coefficients)
    assert result.coefficients.shape == (client.ctx.num_layers, 2, 2)
    assert loss_after < loss_before
    assert all(torch.equal(a, b) for a, b in zip(before_params, client.ctx.model.parameters()))


@pytest.mark.parametrize(("family", "family_noise"), [("llama", 1e-3), ("gemma3", 1e-4)])
def test_training_noise_is_the_model_familys_unless_the_recipe_sets_it(tiny_models, task_dir, family, family_noise):
    """Gemma 3 calibrates with 1e-4 (1e-3, I2CL's, sank it below zero-shot), Llama with I2CL's 1e-3."""
    client = _client(tiny_models[family], task_dir, n=8)
    vectors = client.extract_vectors(batch_size=8)
    start = initial_coefficients(client.ctx.num_layers).numpy()

    def calibrated(noise_scale):
        return client.calibrate(vectors, start, CalibrationConfig(noise_scale=noise_scale), seed=0).coefficients

    assert client.ctx.layout.training_noise == family_noise
    assert np.array_equal(calibrated(None), calibrated(family_noise))
    assert not np.allclose(calibrated(None), calibrated(0.05))


def test_batched_loss_and_gradient_equal_one_at_a_time(llama_dir, task_dir):
    client = _client(llama_dir, task_dir, n=6)
    vectors = torch.from_numpy(client.extract_vectors())
    rows = [0, 1, 2, 3]

    def grad(row_groups):
        coeffs = torch.nn.Parameter(initial_coefficients(client.ctx.num_layers))
        total = sum(client.calibration_loss(vectors, coeffs, g, 0.0) * len(g) for g in row_groups) / len(rows)
        total.backward()
        return float(total.detach()), coeffs.grad.clone()

    batched_loss, batched_grad = grad([rows])
    single_loss, single_grad = grad([[r] for r in rows])
    assert abs(batched_loss - single_loss) < 1e-5
    assert torch.allclose(batched_grad, single_grad, atol=1e-5)


def test_warmup_then_cosine_to_floor():
    factor = warmup_cosine(total_steps=100, warmup_fraction=0.05, lr=1e-2, min_lr=1e-5)
    assert factor(0) < factor(4) == 1.0
    assert np.isclose(factor(99), 1e-3, rtol=0.05) and factor(50) < 1.0
