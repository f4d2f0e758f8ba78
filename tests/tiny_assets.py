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
ENDOFTEXT, IM_START, IM_END = 0, 1, 2  # their ids in build_chatml_tokenizer

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


def tiny_chat_run(ws: Path, output_dir: str, training: dict, chats: int = 32) -> Path:
    """Write ``ws/run.yaml``: a tiny 2-process ZeRO-2 LoRA run (``tiny_qwen2_config(400)``, a
    ``build_chatml_tokenizer`` in ``ws/tokenizer``) on the first ``chats`` real 世说新语 chats, its data
    cache in ``ws/cache``, writing to ``ws/output_dir``, with these ``training:`` keys. Returns the path."""
    import yaml

    build_chatml_tokenizer(ws / "tokenizer", vocab_size=400)
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:chats]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "output_dir": str(ws / output_dir),
        "seed": 0,
        "deepspeed": "zero2.json",
        "model": {"config": tiny_qwen2_config(400), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": training,
    }
    path = ws / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


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


# Qwen3's chat template, written from its published form (Qwen/Qwen3-8B tokenizer_config.json),
# without the tool-calling branches: earlier turns lose their reasoning, the turn after the last
# user message renders a <think> block (empty when it has no reasoning), and enable_thinking=false
# puts an empty block into the generation prompt.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Llama-3 Instruct's chat template (meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_qwen3_tokenizer(out_dir: str | Path):
    """The real Qwen2 vocabulary (Qwen3 shares it) plus ``<think>`` / ``</think>`` as added tokens
    (ids 151936, 151937 here; 151667, 151668 in Qwen3), with ``QWEN3_TEMPLATE``. Saved and returned."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3_TEMPLATE
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_llama3_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """A byte-level BPE trained on ``_CORPUS`` with Llama-3's special tokens (ids 0-4, in
    ``LLAMA3_SPECIALS`` order; bos ``<|begin_of_text|>``, eos ``<|end_of_text|>`` as in the base
    model) and ``LLAMA3_TEMPLATE``. Saved and returned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   additional_special_tokens=LLAMA3_SPECIALS[2:])
    fast.chat_template = LLAMA3_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def prepare(files, tokenizer, *, seed: int = 42, preset=None, preset_overrides_system: bool = False, **data):
    """``data_utils.dataset.prepare_data`` with a ``DataConfig`` built from keyword arguments and the
    tokenizer's detected ``ChatFormat`` (the tests' shorthand)."""
    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data

    if data.get("cache_dir") is not None:
        data["cache_dir"] = str(data["cache_dir"])
    cfg = DataConfig(train=[str(f) for f in files], **data)
    return prepare_data(cfg, ChatFormat(tokenizer), seed=seed, preset=preset, preset_overrides_system=preset_overrides_system)


# ---- packed-vs-alone attention checks (tests/training/test_packed_attention.py, test_varlen_attention.py)

PACKED_SEQ_LENS = [[5, 7, 3], [4, 1, 6, 2]]  # row 0 is 15 tokens (full), row 1 is 13 -> padded with 2
PACKED_VOCAB = 97


def attention_model(attn: str, lora: bool = False, **overrides):
    """A seeded 2-layer Qwen2 (vocab ``PACKED_VOCAB``) in fp32 with ``attn_implementation=attn``, in eval
    mode; ``lora``: LoRA r=4 on the attention and up projections with A and B both random (so both
    get gradients)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = tiny_qwen2_config(vocab_size=PACKED_VOCAB, **overrides)
    cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg), attn_implementation=attn, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                                                 init_lora_weights=False))
    return model.eval()


def packed_rows(seq_lens=PACKED_SEQ_LENS) -> list[dict]:
    """Rows of random ids (seeded) with ``labels == input_ids`` and the given segment lengths."""
    import torch

    g = torch.Generator().manual_seed(1)
    rows = []
    for lens in seq_lens:
        ids = torch.randint(3, PACKED_VOCAB, (sum(lens),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lens": lens})
    return rows


def summed_ce(logits, labels):
    """Summed next-token cross-entropy over trained labels (the shift HF models apply)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def trainable_grads(model) -> dict:
    """A copy of the gradient of every trainable parameter, by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_model(vocab_size: int, seed: int = 0, **overrides):
    """A seeded ``Qwen2ForCausalLM`` from ``tiny_qwen2_config`` (2 layers, hidden 64), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**tiny_qwen2_config(vocab_size, **overrides))
    return AutoModelForCausalLM.from_config(config).eval()


def scripted_lm(vocab_size: int, scripts: dict[tuple[int, ...], list[int]], filler: int):
    """A ``Qwen2ForCausalLM`` whose logits follow a script instead of its weights.

    ``scripts`` maps a prompt (its token ids, no padding) to the ids the model writes after it, in
    order; past the end of a script, and for an unknown prompt, it writes ``filler``. Each row of
    a (left-padded) batch follows its own prompt's script, so rows can stop at different steps.
    The KV cache is off (``generation_config.use_cache = False``): every forward sees the whole
    row, and the logit of the scripted token is 30, every other 0 (greedy = the script).
    """
    import torch
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
