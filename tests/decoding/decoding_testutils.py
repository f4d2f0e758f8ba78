"""Fixtures and helpers for tests/decoding: the tiny ChatML tokenizer, tiny Qwen2 models, an
adapter checkpoint. Test modules import the fixtures they use by name. (Not a conftest.py: two
non-package conftest modules collide when pytest is given overlapping paths.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:  # tiny_assets lives in tests/
    sys.path.insert(0, str(_TESTS))

from tiny_assets import QWEN2_TOKENIZER, REPO_ROOT, build_chatml_tokenizer, tiny_qwen2_config  # noqa: E402,F401

IM_START, IM_END, ENDOFTEXT = 1, 2, 0  # fixed by build_chatml_tokenizer


def tiny_model(vocab_size: int, seed: int = 0, **overrides):
    """A seeded ``Qwen2ForCausalLM`` from ``tiny_qwen2_config`` (2 layers, hidden 64), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**tiny_qwen2_config(vocab_size, **overrides))
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def chatml_tok(tmp_path_factory):
    return build_chatml_tokenizer(tmp_path_factory.mktemp("chatml_tok"))


@pytest.fixture
def random_model(chatml_tok):
    """Untied tiny Qwen2 with large random weights (initializer_range=1.0), so greedy argmax gaps
    are whole logits, not float noise, and replies really depend on the whole prompt."""
    return tiny_model(len(chatml_tok), tie_word_embeddings=False, initializer_range=1.0)


@pytest.fixture(scope="session")
def adapter_ckpt(tmp_path_factory, chatml_tok):
    """``root/base_model`` (tiny Qwen2) and ``root/ckpt`` (LoRA r=4 on q/v with random, non-zero
    B, the tokenizer, generation_config.json with eos [2, 0]). Returns ``(root, peft_model)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    root = tmp_path_factory.mktemp("run")
    tiny_model(len(chatml_tok), seed=1).save_pretrained(root / "base_model")
    base = AutoModelForCausalLM.from_pretrained(root / "base_model")  # so name_or_path is the dir
    torch.manual_seed(2)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    peft_model.save_pretrained(root / "ckpt")
    chatml_tok.save_pretrained(root / "ckpt")
    GenerationConfig(eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT).save_pretrained(root / "ckpt")
    return root, peft_model


def scripted_lm(vocab_size: int, scripts: dict[tuple[int, ...], list[int]], filler: int):
    """A ``Qwen2ForCausalLM`` whose logits follow a script instead of its weights.

    ``scripts`` maps a prompt (its token ids, no padding) to the ids the model writes after it, in
    order; past the end of a script, and for an unknown prompt, it writes ``filler``. Each row of
    a (left-padded) batch follows its own prompt's script, so rows can stop at different steps.
    The KV cache is off (``generation_config.use_cache = False``): every forward sees the whole
    row, and the logit of the scripted token is 30, every other 0 (greedy = the script).
    """
    from transformers import AutoConfig, Qwen2ForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class ScriptedLM(Qwen2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            B, T = input_ids.shape
            logits = torch.zeros(B, T, vocab_size)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            for b in range(B):
                row = input_ids[b][mask[b].bool()].tolist()
                nxt = filler
                for prompt, script in scripts.items():
                    if tuple(row[: len(prompt)]) == prompt:
                        done = len(row) - len(prompt)
                        nxt = script[done] if done < len(script) else filler
                        break
                logits[b, -1, nxt] = 30.0
            return CausalLMOutputWithPast(logits=logits)

    torch.manual_seed(0)
    model = ScriptedLM(AutoConfig.for_model(**tiny_qwen2_config(vocab_size))).eval()
    model.generation_config.use_cache = False
    return model
