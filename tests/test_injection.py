"""The injection math: identity, a hand-computed case, several tasks in one batch, rows outside the table."""

import pytest
import torch

from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel, UnsupportedArchitectureError
from ifedicl.model_patches.inference import encode
from ifedicl.model_patches.injection import InjectionTables, initial_coefficients, inject


def test_inject_hand_computed():
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 3 tokens, d=2
    beta = torch.tensor([1.0, 2.0, 0.5])
    shift = torch.tensor([[0.0, 0.0], [10.0, 20.0], [-1.0, 1.0]])
    got = inject(out, torch.tensor([0, 1, 2]), beta, shift)
    assert torch.equal(got, torch.tensor([[1.0, 2.0], [16.0, 28.0], [1.5, 4.0]]))


def test_rows_outside_the_table_read_the_plain_row():
    """One past the end must not raise and a negative row must not wrap to the last row (vLLM's probe, β = 0)."""
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])  # 5 tokens, d=2
    beta = torch.tensor([1.0, 2.0, 0.0])  # R = 3: plain, a task, a zeroing row last
    shift = torch.tensor([[0.0, 0.0], [10.0, 20.0], [0.0, 0.0]])
    task_row = torch.tensor([3, -1, 1, -3, 2**40])  # past the end, wraps to the last, valid, wraps to 0, huge
    got = inject(out, task_row, beta, shift)
    expected = out.clone()
    expected[2] = 2.0 * out[2] + shift[1]
    assert torch.equal(got, expected)


def test_tables_prepend_identity_row_and_premultiply_lambda():
    v = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    c = initial_coefficients(2)
    c[1, 0] = torch.tensor([0.5, 3.0])
    tables = InjectionTables.build([v], [c])
    assert tables.beta.shape == (2, 2, 2) and tables.shift.shape == (2, 2, 2, 3)
    assert torch.all(tables.beta[:, :, 0] == 1) and torch.all(tables.shift[:, :, 0] == 0)
    assert torch.allclose(tables.shift[1, 0, 1], 0.5 * v[1, 0]) and tables.beta[1, 0, 1] == 3.0


def _model(path):
    return HFContextModel(load_model(str(path))), load_tokenizer(str(path))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_identity_injection_equals_plain_model(tiny_models, family):
    ctx, tok = _model(tiny_models[family])
    ids, mask = encode(tok, ["the film was great .", "a mess"])
    plain = ctx.forward(ids, mask)
    coeffs = torch.zeros(ctx.num_layers, 2, 2)
    coeffs[..., 1] = 1.0  # λ = 0, β = 1
    tables = InjectionTables.build([torch.randn(ctx.num_layers, 2, ctx.hidden_size)], [coeffs])
    with ctx.injecting(tables, torch.ones(2, dtype=torch.long), ids.shape[1]):
        injected = ctx.forward(ids, mask)
    assert torch.equal(plain, injected)


def test_several_tasks_in_one_batch_each_get_their_own(llama_dir):
    ctx, tok = _model(llama_dir)
    torch.manual_seed(0)
    L, d = ctx.num_layers, ctx.hidden_size
    vectors = [torch.randn(L, 2, d) for _ in range(2)]
    coeffs = [initial_coefficients(L) * s for s in (1.0, 3.0)]
    tables = InjectionTables.build(vectors, coeffs)
    text = ["the plot was dull ."] * 3
    ids, mask = encode(tok, text)
    with ctx.injecting(tables, torch.tensor([0, 1, 2]), ids.shape[1]):
        mixed = ctx.forward(ids, mask)
    for row, task in enumerate([0, 1, 2]):
        if task == 0:
            alone = ctx.forward(ids[:1], mask[:1])
        else:
            single = InjectionTables.build([vectors[task - 1]], [coeffs[task - 1]])
            with ctx.injecting(single, torch.tensor([1]), ids.shape[1]):
                alone = ctx.forward(ids[:1], mask[:1])
        assert torch.allclose(mixed[row], alone[0], atol=1e-5)
    assert not torch.allclose(mixed[1], mixed[2])


def test_hf_rows_outside_the_tables_are_served_plain(llama_dir):
    """Through the HF hooks: rows 2 and -1 of one-task tables (R = 2) give the plain model's logits."""
    ctx, tok = _model(llama_dir)
    torch.manual_seed(0)
    vectors = torch.randn(ctx.num_layers, 2, ctx.hidden_size)
    tables = InjectionTables.build([vectors], [initial_coefficients(ctx.num_layers)])
    ids, mask = encode(tok, ["the plot was dull ."] * 4)
    plain = ctx.forward(ids, mask)  # [4, V]
    with ctx.injecting(tables, torch.tensor([1, 2, -1, 0]), ids.shape[1]):
        injected = ctx.forward(ids, mask)  # [4, V]
    assert not torch.allclose(injected[0], plain[0], atol=1e-4)  # row 1 really injects
    for row in (1, 2, 3):
        assert torch.equal(injected[row], plain[row]), f"batch row {row}"


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture"):
        HFContextModel(torch.nn.Linear(2, 2))
