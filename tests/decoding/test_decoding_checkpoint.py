from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from tiny_assets import ENDOFTEXT, IM_END

from packlora.decoding.generate import load_checkpoint

IDS = torch.tensor([[1, 50, 60, 70, 2, 201, 1, 80]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _copy_run(root, tmp_path, with_base=True):
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    if with_base:
        shutil.copytree(root / "base_model", tmp_path / "base_model")
    return tmp_path / "ckpt"


def _set_base_path(ckpt, value):
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = value
    (ckpt / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_checkpoint_loads_with_its_stop_ids_and_same_logits(adapter_ckpt, caplog):
    root, peft_model = adapter_ckpt
    assert json.loads((root / "ckpt" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        root / "base_model"
    )
    with caplog.at_level(logging.INFO, logger="packlora.core.checkpoint"):
        ckpt = load_checkpoint(root / "ckpt")
    assert "recorded as" not in caplog.text  # the sibling base_model is the recorded one
    assert ckpt.stop_ids == (IM_END, ENDOFTEXT)
    assert ckpt.max_new_tokens == 512
    assert ckpt.base_model_path == root / "base_model"
    assert not ckpt.model.training
    assert ckpt.model.generation_config.eos_token_id == [IM_END, ENDOFTEXT]
    assert next(ckpt.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(ckpt.model), _logits(peft_model), atol=1e-6, rtol=0)
    with peft_model.disable_adapter():  # ...and the adapter really is applied
        assert (_logits(ckpt.model) - _logits(peft_model)).abs().max() > 1e-2


def test_moved_run_finds_its_sibling_base_model_before_the_recorded_path(adapter_ckpt, tmp_path, caplog):
    root, peft_model = adapter_ckpt
    ckpt_dir = _copy_run(root, tmp_path)
    _set_base_path(ckpt_dir, "/nonexistent/base")  # recorded where the run used to be
    with caplog.at_level(logging.INFO, logger="packlora.core.checkpoint"):
        ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.base_model_path == tmp_path / "base_model"
    assert "/nonexistent/base" in caplog.text and str(tmp_path / "base_model") in caplog.text
    torch.testing.assert_close(_logits(ckpt.model), _logits(peft_model), atol=1e-6, rtol=0)


def test_base_inside_the_checkpoint_wins_over_the_sibling_and_the_recorded_path(adapter_ckpt, tmp_path):
    from packlora.core.checkpoint import resolve_base_model

    ckpt_dir = _copy_run(adapter_ckpt[0], tmp_path)
    shutil.copytree(tmp_path / "base_model", ckpt_dir / "base_model")
    assert resolve_base_model(ckpt_dir) == ckpt_dir / "base_model"


def test_missing_base_raises_naming_the_paths_tried(adapter_ckpt, tmp_path):
    ckpt_dir = _copy_run(adapter_ckpt[0], tmp_path, with_base=False)
    _set_base_path(ckpt_dir, "/nonexistent/base")
    with pytest.raises(FileNotFoundError, match=f"tried {ckpt_dir / 'base_model'}, {tmp_path / 'base_model'}, "
                                                "/nonexistent/base"):
        load_checkpoint(ckpt_dir)


def test_packlora_config_sets_max_new_tokens_and_extra_stop_tokens(adapter_ckpt, tmp_path, chatml_tokenizer):
    ckpt_dir = _copy_run(adapter_ckpt[0], tmp_path)
    gen = json.loads((ckpt_dir / "generation_config.json").read_text())
    (ckpt_dir / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 9}))
    assert load_checkpoint(ckpt_dir).max_new_tokens == 9
    (ckpt_dir / "packlora_config.yaml").write_text("decoding:\n  stop_tokens: ['!']\n  max_new_tokens: 7\n")
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.max_new_tokens == 7
    assert ckpt.stop_ids == (IM_END, ENDOFTEXT, chatml_tokenizer.get_vocab()["!"])


def test_plain_model_checkpoint_loads_without_base(adapter_ckpt, tmp_path, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    root = adapter_ckpt[0]
    base = AutoModelForCausalLM.from_pretrained(root / "base_model")
    base.save_pretrained(tmp_path / "merged")
    chatml_tokenizer.save_pretrained(tmp_path / "merged")  # no generation_config.json: tokenizer stops only
    ckpt = load_checkpoint(tmp_path / "merged")
    assert ckpt.base_model_path is None
    assert ckpt.stop_ids == (IM_END, ENDOFTEXT)
    torch.testing.assert_close(_logits(ckpt.model), _logits(base), atol=0, rtol=0)


def test_directory_without_model_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither adapter_config.json .* nor config.json"):
        load_checkpoint(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_bf16_and_seeded_sampling_repeats(adapter_ckpt):
    from packlora.decoding.generate import Sampling, generate_replies

    ckpt = load_checkpoint(adapter_ckpt[0] / "ckpt")
    param = next(ckpt.model.parameters())
    assert (param.device.type, param.dtype) == ("cuda", torch.bfloat16)
    convs = [[{"role": "user", "content": "Hello!"}], [{"role": "user", "content": "The quick brown fox"}]]
    kwargs = dict(max_new_tokens=8, sampling=Sampling(do_sample=True, temperature=2.0, seed=0))
    first = generate_replies(ckpt.model, ckpt.fmt, convs, ckpt.stop_ids, **kwargs)
    assert first == generate_replies(ckpt.model, ckpt.fmt, convs, ckpt.stop_ids, **kwargs)
