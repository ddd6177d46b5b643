"""Capture reads each block's output at the last real token, whatever the padding and batching."""

import pytest
import torch

from ifedicl.kernel.modeling import load_model, load_tokenizer
from ifedicl.model_patches.hf import HFContextModel
from ifedicl.model_patches.inference import capture_sum

TEXTS = ["the film was great .", "a mess", "the soundtrack was a joy to watch and the cast was brilliant ."]


def _independent_capture(model, blocks, tok, text):
    """Block outputs at the last token of one unpadded sequence, read by plain forward hooks."""
    seen = {}
    handles = []
    for layer, pair in enumerate(blocks):
        for block, module in enumerate(pair):

            def hook(_m, _i, out, key=(layer, block)):
                seen[key] = (out[0] if isinstance(out, tuple) else out)[0, -1].detach().clone()

            handles.append(module.register_forward_hook(hook))
    ids = tok(text, return_tensors="pt")["input_ids"]
    model(input_ids=ids)
    for h in handles:
        h.remove()
    return torch.stack([torch.stack([seen[(layer, b)] for b in range(2)]) for layer in range(len(blocks))])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_matches_independent_hooks_under_padding(tiny_models, family, side):
    model = load_model(str(tiny_models[family]))
    tok = load_tokenizer(str(tiny_models[family]))
    ctx = HFContextModel(model)
    enc = tok(TEXTS, padding=True, return_tensors="pt", padding_side=side)
    with ctx.capturing(enc["attention_mask"]) as captured:
        ctx.forward(enc["input_ids"], enc["attention_mask"])
    ctx.remove_hooks()
    for row, text in enumerate(TEXTS):
        expected = _independent_capture(model, ctx.blocks, tok, text)  # [L, 2, d]
        got = torch.stack([torch.stack([captured[layer][b][row] for b in range(2)]) for layer in range(ctx.num_layers)])
        assert torch.allclose(got, expected, atol=1e-5), f"row {row} ({side} padding)"


def test_batched_capture_equals_one_at_a_time(llama_dir):
    ctx = HFContextModel(load_model(str(llama_dir)))
    tok = load_tokenizer(str(llama_dir))
    texts = TEXTS * 3
    batched = capture_sum(ctx, tok, texts, batch_size=4)
    single = capture_sum(ctx, tok, texts, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-4)


def test_bfloat16_autocast_capture_is_close_to_float32(llama_dir):
    ctx = HFContextModel(load_model(str(llama_dir)))
    tok = load_tokenizer(str(llama_dir))
    full = capture_sum(ctx, tok, TEXTS, batch_size=2)
    low = capture_sum(ctx, tok, TEXTS, batch_size=2, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    assert torch.allclose(low, full, rtol=0.05, atol=0.05)
