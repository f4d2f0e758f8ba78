"""packlora export --merge: a plain model directory whose logits equal base + adapter."""
import json

import pytest
import torch

from tiny_assets import tiny_qwen2_config
from packlora.core.checkpoint import write_extras
from packlora.training.export import main

RANK, ALPHA = 4, 8
SCALE = 2.0  # ALPHA / RANK, written out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, chatml_tokenizer):
    """A random tiny Qwen2 base and a LoRA adapter with non-zero B (so merging changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    ws = tmp_path_factory.mktemp("export")
    spec = tiny_qwen2_config(400)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.float32)
    base.save_pretrained(ws / "base_model")
    peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(ws / "ckpt")
    write_extras(ws / "ckpt", chatml_tokenizer, {"decoding": {"stop_tokens": ["<|im_end|>", "<|endoftext|>"],
                                                               "max_new_tokens": 16}}, [2, 0], 0, 16)
    return ws / "ckpt"


def test_merged_model_loads_plainly_and_matches_base_plus_adapter(checkpoint, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "merged"
    assert main([str(checkpoint), "--merge", str(out)]) == 0
    assert "wrote merged model" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "packlora_export.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert GenerationConfig.from_pretrained(out).eos_token_id == [2, 0]
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") == 2
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint.parent / "base_model"),
                                         checkpoint).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52]])
    with torch.no_grad():
        want = unmerged(input_ids=ids, use_cache=False).logits
        got = merged(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # the merged q_proj is W + (alpha / r) * B @ A, by hand
    base_w = load_file(str(checkpoint.parent / "base_model" / "model.safetensors"))
    lora = load_file(str(checkpoint / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    a, b = lora[f"base_model.model.{key}.lora_A.weight"], lora[f"base_model.model.{key}.lora_B.weight"]
    expected = base_w[f"{key}.weight"] + SCALE * b @ a
    assert torch.allclose(load_file(str(out / "model.safetensors"))[f"{key}.weight"], expected, atol=1e-6)
    assert json.loads((out / "packlora_export.json").read_text())["stop_ids"] == [2, 0]


def test_export_refuses_a_non_adapter_dir_and_a_non_empty_output(checkpoint, tmp_path, capsys):
    assert main([str(tmp_path), "--merge", str(tmp_path / "m")]) == 1
    assert "has no adapter_config.json, so there is no adapter to merge" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main([str(checkpoint), "--merge", str(busy)]) == 1
    assert "is not empty; choose a new directory or pass --overwrite" in capsys.readouterr().err
