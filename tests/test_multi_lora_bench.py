"""bench/multi_lora.py's adapters: FedAvg-LoRA shaped, readable by vLLM's LoRA loader, live in peft.

No engine starts here (the bench itself measures vLLM); a tiny random Llama keeps it to seconds.
"""

from __future__ import annotations

import json

import torch


def test_adapters_load_in_vllm_and_change_outputs(llama_dir, tmp_path):
    from peft import PeftModel
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from bench.multi_lora import hf_label_logits, make_adapters, measure_hf
    from ifedicl.kernel.modeling import load_model, load_tokenizer

    paths = make_adapters(llama_dir, 3, out_dir=tmp_path)
    assert [p.name for p in paths] == ["adapter-000", "adapter-001", "adapter-002"]
    config = json.loads((paths[0] / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    # vLLM's loader reads every adapter: q and v of each layer, non-zero B, adapters distinct.
    layers = load_model(str(llama_dir)).config.num_hidden_layers
    loaded = []
    for k, path in enumerate(paths):
        helper = PEFTHelper.from_local_dir(str(path), max_position_embeddings=1024)
        lora = LoRAModel.from_local_checkpoint(str(path), {"q_proj", "v_proj"}, helper, lora_model_id=k + 1,
                                               device="cpu", dtype=torch.float32)
        assert len(lora.loras) == 2 * layers and all(w.rank == 8 for w in lora.loras.values())
        assert all(w.lora_b.abs().max() > 0 for w in lora.loras.values())
        loaded.append(lora)
    name = next(iter(loaded[0].loras))
    assert not torch.equal(loaded[0].loras[name].lora_b, loaded[1].loras[name].lora_b)

    # HF fallback: a mixed-adapter batch equals each adapter alone, and differs from plain.
    tokenizer = load_tokenizer(str(llama_dir))
    prompts = [tokenizer(t)["input_ids"] for t in ("a good film", "the plot was dull and long", "great", "bad acting")]
    label_ids = [tokenizer(" good")["input_ids"][0], tokenizer(" bad")["input_ids"][0]]
    pad = tokenizer.pad_token_id
    plain = load_model(str(llama_dir))
    peft_model = PeftModel.from_pretrained(load_model(str(llama_dir)), str(paths[0]), adapter_name="a0")
    for k, path in enumerate(paths[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"a{k}")
    names = ["a0", "a1", "a2", "a0"]
    with torch.no_grad():
        base = hf_label_logits(plain, prompts, label_ids, pad)
        mixed = hf_label_logits(peft_model, prompts, label_ids, pad, adapter_names=names)
        for row, adapter in enumerate(names):
            alone = hf_label_logits(peft_model, prompts, label_ids, pad, adapter_names=[adapter] * len(prompts))
            torch.testing.assert_close(mixed[row], alone[row], atol=1e-4, rtol=1e-4)
    assert (mixed - base).abs().max() > 1e-3
    stats = measure_hf(peft_model, prompts, label_ids, pad, ["a0", "a1"], batch=2)
    assert stats["n"] == 4 and stats["adapters"] == 2 and stats["req_s"] > 0
