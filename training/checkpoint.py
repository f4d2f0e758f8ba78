"""What every checkpoint holds besides the adapter, and the check that the adapter is whole.

A packlora checkpoint directory (``output_dir/checkpoint-N`` and the final ``output_dir``)::

    adapter_config.json          PEFT; base_model_name_or_path = absolute base directory
    adapter_model.safetensors    every LoRA tensor at full shape (also under ZeRO-3)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    generation_config.json       eos_token_id = the stop IDs, e.g. [151645, 151643]
    packlora_config.yaml         the resolved run config

It loads with plain ``PeftModel.from_pretrained`` and decodes with ``packlora decode``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)
CONFIG_NAME = "packlora_config.yaml"


class IncompleteAdapterError(RuntimeError):
    """A saved adapter is missing tensors or has wrong/zero-size shapes."""


def stop_token_ids(tokenizer, stop_tokens: list[str]) -> list[int]:
    """Ids of ``decoding.stop_tokens``, in order, each a single token of the vocabulary.

    Raises:
        ValueError: a stop token is not one token of this tokenizer.
    """
    vocab = tokenizer.get_vocab()
    missing = [s for s in stop_tokens if s not in vocab]
    if missing:
        raise ValueError(
            f"decoding.stop_tokens: {missing} are not single tokens of the tokenizer; "
            "use special tokens such as <|im_end|> (multi-token stop strings belong to the decoder)"
        )
    ids = []
    for s in stop_tokens:
        if vocab[s] not in ids:
            ids.append(vocab[s])
    return ids


def write_checkpoint_extras(ckpt_dir: str | Path, tokenizer, config: dict, stop_ids: list[int], max_new_tokens: int) -> None:
    """Write tokenizer, ``generation_config.json`` (stop IDs) and ``packlora_config.yaml``."""
    from transformers import GenerationConfig

    ckpt_dir = Path(ckpt_dir)
    tokenizer.save_pretrained(ckpt_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[-1]
    GenerationConfig(eos_token_id=list(stop_ids), pad_token_id=pad, max_new_tokens=max_new_tokens).save_pretrained(ckpt_dir)
    (ckpt_dir / CONFIG_NAME).write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")


def verify_adapter(ckpt_dir: str | Path, expected: dict[str, tuple[int, ...]]) -> int:
    """Check ``adapter_model.safetensors`` holds exactly the expected LoRA tensors at full shape.

    Args:
        ckpt_dir: checkpoint directory.
        expected: saved tensor name -> full shape (``training.model.lora_shapes``).

    Returns:
        Number of tensors checked.

    Raises:
        IncompleteAdapterError: a tensor is missing, unexpected, zero-size or of the wrong shape.
    """
    from safetensors import safe_open

    path = Path(ckpt_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise IncompleteAdapterError(f"{path} was not written")
    with safe_open(str(path), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k} has shape {saved[k]}, expected {s}" for k, s in expected.items() if k in saved and saved[k] != s]
    problems += [f"{k} is empty {s}" for k, s in saved.items() if 0 in s or not s]
    if problems:
        raise IncompleteAdapterError(f"{path}: " + "; ".join(problems[:10]))
    return len(saved)


def read_config(ckpt_dir: str | Path) -> dict:
    """The resolved run config stored in a checkpoint."""
    return yaml.safe_load((Path(ckpt_dir) / CONFIG_NAME).read_text(encoding="utf-8"))


def adapter_base(ckpt_dir: str | Path) -> str:
    """``base_model_name_or_path`` of a checkpoint's adapter."""
    return json.loads((Path(ckpt_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
