"""The model's eos, pad and bos are set from the run's chat format before the Trainer compares them
with the tokenizer, so transformers finds nothing to "update" (its "Updated tokens: {'eos_token_id':
...}" message, which reads as if the end of turn had been dropped) and the stop ids stay in order."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model

from packlora.training.model import align_special_tokens
from tiny_assets import ENDOFTEXT, IM_END, tiny_model


def _config_built_base(vocab_size: int):
    """A base as packlora builds one from ``model.config``: a single eos id in its config, the stop ids
    in its generation config."""
    model = tiny_model(vocab_size)
    model.config.eos_token_id = model.config.pad_token_id = None
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [IM_END, ENDOFTEXT], ENDOFTEXT
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))


def _transformers_updates(model, tokenizer, monkeypatch) -> list[str]:
    from transformers import trainer_utils

    said = []
    monkeypatch.setattr(trainer_utils.logger, "warning", lambda msg, *a, **k: said.append(msg))
    trainer_utils.align_special_tokens(model, tokenizer)  # what Trainer.__init__ runs
    return said


def test_an_aligned_model_gives_transformers_nothing_to_update_and_keeps_the_stop_ids_in_order(
        chatml_tokenizer, monkeypatch):
    control = _config_built_base(len(chatml_tokenizer))
    assert "Updated tokens: {'eos_token_id': 0, 'pad_token_id': 0}" in _transformers_updates(control, chatml_tokenizer, monkeypatch)[0]

    model = _config_built_base(len(chatml_tokenizer))
    line = align_special_tokens(model, chatml_tokenizer, [IM_END, ENDOFTEXT], ENDOFTEXT)

    assert _transformers_updates(model, chatml_tokenizer, monkeypatch) == []
    inner = model.get_base_model()
    assert inner.generation_config.eos_token_id == inner.config.eos_token_id == [IM_END, ENDOFTEXT]
    assert inner.generation_config.pad_token_id == inner.config.pad_token_id == ENDOFTEXT
    assert line == f"stop ids in force: eos_token_id [{IM_END}, {ENDOFTEXT}] (model config and generation config), " \
                   f"pad_token_id {ENDOFTEXT}"


def test_loading_a_checkpoint_raises_no_is_gradient_checkpointing_warning(adapter_ckpt):
    import warnings

    from packlora.decoding.generate import load_checkpoint

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_checkpoint(adapter_ckpt[0] / "ckpt")
    assert [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)] == []
