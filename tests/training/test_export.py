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


# ------------------------------------------------------------------- tied input/output embeddings


@pytest.fixture(scope="module", params=[["q_proj", "v_proj", "lm_head"], ["embed_tokens"]], ids=["lm_head", "embed_tokens"])
def tied_checkpoint(request, tmp_path_factory, chatml_tokenizer):
    """A tiny Qwen2 base whose lm_head IS embed_tokens (``tie_word_embeddings: true``, as in
    Qwen2-0.5B) and a LoRA with non-zero B on one of the two tied modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    ws = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2_config(400)), dtype=torch.float32)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(ws / "base_model")
    peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=request.param,
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(ws / "ckpt")
    write_extras(ws / "ckpt", chatml_tokenizer, {}, [2, 0], 0, 16)
    return ws / "ckpt", request.param[-1]


def _adapter_logits(ckpt, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt.parent / "base_model"), ckpt).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_a_lora_on_a_tied_embedding_merges_into_an_untied_copy_with_the_adapters_logits(tied_checkpoint, tmp_path):
    """Merged into the one shared tensor, the delta also changed the other embedding (the logits were
    up to 4.4 off with the lm_head LoRA here); untied, each tensor is what the adapter computes with."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpt, adapted = tied_checkpoint
    out = tmp_path / "merged"
    assert main([str(ckpt), "--merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.tie_word_embeddings is False
    assert json.loads((out / "packlora_export.json").read_text())["tie_word_embeddings"] is False

    # by hand: the adapted tensor is E + (alpha / r) * B @ A, the other one is E itself
    E = load_file(str(ckpt.parent / "base_model" / "model.safetensors"))["model.embed_tokens.weight"]  # (400, 64)
    lora = load_file(str(ckpt / "adapter_model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    if adapted == "lm_head":
        a, b = lora["base_model.model.lm_head.lora_A.weight"], lora["base_model.model.lm_head.lora_B.weight"]
        assert (a.shape, b.shape) == ((RANK, 64), (400, RANK))
        assert torch.allclose(saved["lm_head.weight"], E + SCALE * b @ a, atol=1e-6)
        assert torch.equal(saved["model.embed_tokens.weight"], E)
    else:  # PEFT's embedding LoRA: lora_embedding_A (r, vocab), lora_embedding_B (hidden, r); delta = (B @ A).T
        a = lora["base_model.model.model.embed_tokens.lora_embedding_A"]
        b = lora["base_model.model.model.embed_tokens.lora_embedding_B"]
        assert (a.shape, b.shape) == ((RANK, 400), (64, RANK))
        assert torch.allclose(saved["model.embed_tokens.weight"], E + SCALE * (b @ a).T, atol=1e-6)
        assert torch.equal(saved["lm_head.weight"], E)

    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52], [399, 398, 7, 0, 1, 2, 300, 301, 302, 5]])
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits
    want = _adapter_logits(ckpt, ids)
    assert (got - want).abs().max() < 1e-4


def test_export_refuses_a_merge_whose_probe_logits_differ_from_the_adapter(tied_checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    """Without the untie (the merge every trainer did), the probe catches the corrupted embedding and
    nothing is written."""
    from packlora.core import checkpoint as ckpt_format

    ckpt, _ = tied_checkpoint
    monkeypatch.setattr(ckpt_format, "untie_adapted_embeddings", lambda model: False)
    out = tmp_path / "merged"
    assert main([str(ckpt), "--merge", str(out)]) == 1
    err = capsys.readouterr().err
    assert "logits on the probe batch differ from its adapter (base + LoRA, unmerged) by up to" in err
    assert "Refusing to write it" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_a_saved_model_that_loads_back_different(tied_checkpoint, tmp_path, monkeypatch, capsys):
    """A save that loses the untied ``lm_head.weight`` (as a writer that trusts the base's
    ``tie_word_embeddings`` would): the model loads back with a fresh head, the tensor check (saved vs
    in memory) refuses it, and nothing is left."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_without_lm_head(self, out_dir, *args, **kwargs):
        original(self, out_dir, *args, **kwargs)
        weights = load_file(f"{out_dir}/model.safetensors")
        weights.pop("lm_head.weight")
        save_file(weights, f"{out_dir}/model.safetensors", metadata={"format": "pt"})

    ckpt, _ = tied_checkpoint
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_without_lm_head)
    out = tmp_path / "merged"
    assert main([str(ckpt), "--merge", str(out)]) == 1
    assert f"the merged model saved to {tmp_path / '.packlora-export-merged'} is wrong" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_stage2_init_from_merges_a_tied_lm_head_adapter_into_an_untied_base(tied_checkpoint, tmp_path):
    """``init_mode: merge`` goes through the same checked merge (``materialize_init_base``)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from packlora.training.init_from import materialize_init_base

    ckpt, _ = tied_checkpoint
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(ckpt)
    cfg = SimpleNamespace(init_from=str(ckpt), init_mode="merge", output_dir=str(tmp_path / "stage2"),
                          model=SimpleNamespace(name_or_path=None))
    base = materialize_init_base(cfg, tokenizer, SimpleNamespace(process_index=0), [2, 0], 0)
    merged = AutoModelForCausalLM.from_pretrained(base).eval()
    assert merged.config.tie_word_embeddings is False
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52]])
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits
    assert (got - _adapter_logits(ckpt, ids)).abs().max() < 1e-4
