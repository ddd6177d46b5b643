"""The objective option: label-only and full-vocabulary cross-entropy, checked against a direct computation.

Direct = a plain forward of the unmodified HF model on each prompt alone (no padding, no
hooks), then ``-log softmax`` by hand over the label words' logits (label-only) or the
whole vocabulary (full-vocab). The project's paths must give the same numbers: Λ
calibration at identity injection (λ=0, β=1) and LoRA before training (B=0).
"""

import numpy as np
import pytest
import torch

from ifedicl.federation_job.client import CalibrationConfig, Client
from ifedicl.federation_job.lora import LoraClient, LoraSettings
from ifedicl.federation_job.objective import label_log_prior, label_word_loss
from ifedicl.kernel.data import load_task_dir
from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel

ROWS = [0, 1, 2, 3, 4]


def _client(llama_dir, task_dir):
    data = load_task_dir(task_dir)
    ctx = HFContextModel(load_model(str(llama_dir)))
    return Client(ctx, load_tokenizer(str(llama_dir)), data.task, data.train.head(8))


@torch.no_grad()
def _direct(llama_dir, client: Client, objective: str, prior_correction: bool = False) -> float:
    model = load_model(str(llama_dir))  # a separate copy: no hooks, no adapters
    counts = np.bincount(client.data.labels, minlength=len(client.task.labels)) + 1.0  # the whole shard's, smoothed
    losses = []
    for i in ROWS:
        ids = client.tokenizer(client.task.prompt(client.data.texts[i]), return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits[0, -1].double()  # [V] at the last token
        if prior_correction:
            logits[client.label_ids] += torch.as_tensor(np.log(counts / counts.sum()))
        pool = logits[client.label_ids] if objective == "label-only" else logits
        target = logits[client.label_ids[client.data.labels[i]]]
        losses.append(float(torch.logsumexp(pool, 0) - target))
    return float(np.mean(losses))


def test_calibration_loss_per_objective_equals_direct_cross_entropy(llama_dir, task_dir):
    client = _client(llama_dir, task_dir)
    L, d = client.ctx.num_layers, client.ctx.hidden_size
    vectors = torch.randn(L, 2, d)
    identity = torch.stack([torch.zeros(L, 2), torch.ones(L, 2)], dim=-1)  # λ=0, β=1: the plain model
    got = {o: float(client.calibration_loss(vectors, identity, ROWS, 0.0, o)) for o in ("label-only", "full-vocab")}
    want = {o: _direct(llama_dir, client, o) for o in got}
    assert got["label-only"] == pytest.approx(want["label-only"], abs=1e-4)
    assert got["full-vocab"] == pytest.approx(want["full-vocab"], abs=1e-4)
    assert got["label-only"] < got["full-vocab"]  # the label words are a strict subset of the vocabulary
    for objective in got:  # prior correction: the shard's label log-prior added to the label logits
        corrected = float(client.calibration_loss(vectors, identity, ROWS, 0.0, objective, prior_correction=True))
        assert corrected == pytest.approx(_direct(llama_dir, client, objective, prior_correction=True), abs=1e-4)
        assert abs(corrected - got[objective]) > 1e-3, objective


def test_lora_batch_loss_per_objective_equals_direct_cross_entropy(llama_dir, task_dir):
    client = _client(llama_dir, task_dir)
    lora = LoraClient(client, LoraSettings(rank=4, alpha=8))  # B = 0: the adapted model is the base model
    for objective in ("label-only", "full-vocab"):
        for prior_correction in (False, True):
            config = CalibrationConfig(objective=objective, prior_correction=prior_correction)
            got = float(lora.batch_loss(ROWS, config).detach())
            want = _direct(llama_dir, client, objective, prior_correction)
            assert got == pytest.approx(want, abs=1e-4), (objective, prior_correction)


def test_label_only_is_cross_entropy_over_the_label_logits():
    logits = torch.randn(3, 50, dtype=torch.float64)
    label_ids, classes = [7, 19, 3], torch.tensor([2, 0, 1])
    expected = -torch.log_softmax(logits[:, label_ids], dim=1)[torch.arange(3), classes].mean()
    assert float(label_word_loss(logits, classes, label_ids, "label-only")) == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="unknown objective"):
        label_word_loss(logits, classes, label_ids, "label-words")


@pytest.mark.parametrize("objective", ["label-only", "full-vocab"])
def test_prior_correction_makes_the_balanced_classifier_the_local_optimum(objective):
    """A client with 80 % of class 0 fits its label mix without correction, and a near-uniform classifier with it."""
    classes = torch.tensor([0] * 80 + [1] * 20)
    label_ids = [3, 5]
    log_prior = label_log_prior(classes.tolist(), 2)

    def fitted(prior):
        bias = torch.zeros(2, requires_grad=True)  # the model's only freedom: a bias on the two label logits
        optimizer = torch.optim.Adam([bias], lr=0.05)
        for _ in range(600):
            logits = torch.zeros(len(classes), 9).index_add(1, torch.tensor(label_ids), bias.expand(len(classes), 2))
            loss = label_word_loss(logits, classes, label_ids, objective, prior)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(torch.softmax(bias.detach(), 0)[0])

    assert label_log_prior([0, 0, 0], 3).exp().tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6])  # add-one smoothed
    if objective == "label-only":
        assert fitted(None) == pytest.approx(0.8, abs=0.01)  # learned the client's own label mix
    assert fitted(log_prior) == pytest.approx(0.5, abs=0.02)  # learned no label preference
