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
