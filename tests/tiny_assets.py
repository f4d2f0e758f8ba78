"""Small, fast stand-ins for the real assets, built on the fly (no hub, no download).

* ``build_chatml_tokenizer(dir)``: a byte-level BPE tokenizer trained with the ``tokenizers``
  library, with the same ChatML special tokens and the same chat template as the real Qwen2
  tokenizer in ``../shared/assets/qwen2-tokenizer`` (so ``eos_token`` is ``<|endoftext|>``,
  exactly the setting in which a chat model that is not told to stop at ``<|im_end|>`` runs on).
* ``tiny_qwen2_config(vocab_size)``: a Qwen2-architecture config small enough to train on CPU
  in seconds.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
QWEN2_TOKENIZER = SHARED / "assets" / "qwen2-tokenizer"
SHISHUO_CHATS = SHARED / "data" / "shishuo" / "stage2_rewrite.jsonl"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "system user assistant You are a helpful assistant",
    "The quick brown fox jumps over the lazy dog.",
    "Rewrite this sentence in the style of an old novel, please.",
    "Hello! How are you today? I am fine, thank you.",
    "Once upon a time there lived a scholar who loved wine and poems.",
    "世说新语 王戎 嵇康 阮籍 山涛 刘伶 竹林七贤 之 也 曰 者 乎",
    "0123456789 ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def build_chatml_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer with ChatML specials and save it to ``out_dir``.

    Returns the loaded ``PreTrainedTokenizerFast``. Special ids are fixed: ``<|endoftext|>`` = 0,
    ``<|im_start|>`` = 1, ``<|im_end|>`` = 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = (QWEN2_TOKENIZER / "chat_template.jinja").read_text()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_qwen2_config(vocab_size: int, **overrides) -> dict:
    """A Qwen2 config dict (``model_type: qwen2``) with 2 layers and hidden size 64."""
    cfg = dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return cfg
