"""The on-disk format of a packlora checkpoint, for writing and reading alike.

A checkpoint directory (``output_dir/checkpoint-N`` and the final ``output_dir``)::

    adapter_config.json          PEFT; base_model_name_or_path = the base directory when saved
    adapter_model.safetensors    every LoRA tensor at full shape (also under ZeRO-3)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    generation_config.json       eos_token_id = the stop ids, e.g. [151645, 151643]
    packlora_config.yaml         the resolved run config
    packlora_complete.json       written last, checkpoint-N only: {"global_step": N}

A full model (``lora: null``, or a merged export) has ``config.json`` + ``model.safetensors``
instead of the adapter files. Training writes (``write_extras``, ``verify_adapter``), decoding and
export read (``load_model``, ``stop_ids``, ``run_config``), and both find an adapter's base with
``resolve_base_model``, which follows a run that was moved or copied elsewhere.

This module imports nothing from ``training``; training imports it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from packlora.data_utils.configtools import Section

logger = logging.getLogger(__name__)
CONFIG_NAME = "packlora_config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GENERATION_CONFIG = "generation_config.json"
BASE_MODEL_DIR = "base_model"


@dataclass(frozen=True, kw_only=True)
class DecodingConfig(Section):
    """A run's ``decoding:`` section: how its checkpoints stop (``generation_config.json``)::

        decoding: {stop_tokens: null, max_new_tokens: 512}   # null: the chat format's end of turn and text
    """

    section = "decoding"

    stop_tokens: list[str] | None = None
    """Tokens that end generation, each exactly one token of the tokenizer; their ids become
    ``generation_config.eos_token_id``. null: the chat format's own end-of-turn and end-of-text
    tokens (``ChatFormat.default_stop_tokens``). Multi-token stop strings belong to the decoder."""
    max_new_tokens: int = field(default=512, metadata={"min": 1, "unit": "tokens"})
    """Generation length limit."""


class IncompleteAdapterError(RuntimeError):
    """A saved adapter is missing tensors or has wrong/zero-size shapes."""


def is_adapter(ckpt: str | Path) -> bool:
    """True for a LoRA checkpoint (``adapter_config.json``), False for a full model."""
    return (Path(ckpt) / ADAPTER_CONFIG).is_file()


def write_extras(ckpt: str | Path, tokenizer, config: dict, stop_ids: list[int], pad_id: int,
                 max_new_tokens: int | None) -> None:
    """Write the tokenizer, ``generation_config.json`` (``eos_token_id`` = ``stop_ids``) and
    ``packlora_config.yaml`` (the resolved run config) into ``ckpt``."""
    ckpt = Path(ckpt)
    tokenizer.save_pretrained(ckpt)
    generation_config(stop_ids, pad_id, max_new_tokens).save_pretrained(ckpt)
    (ckpt / CONFIG_NAME).write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")


def generation_config(stop_ids: list[int], pad_id: int, max_new_tokens: int | None = None):
    """A ``GenerationConfig`` that stops at ``stop_ids`` and pads with ``pad_id``."""
    from transformers import GenerationConfig

    extra = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return GenerationConfig(eos_token_id=list(stop_ids), pad_token_id=pad_id, **extra)


def set_stop_ids(model, stop_ids: list[int], pad_id: int) -> None:
    """Make ``model.generation_config`` (saved with the model) stop at ``stop_ids``: so that plain
    ``model.generate()`` stops where packlora's decoder does, also after a plain PEFT load."""
    model.generation_config.eos_token_id = list(stop_ids)
    model.generation_config.pad_token_id = pad_id


def verify_adapter(ckpt: str | Path, expected: dict[str, tuple[int, ...]]) -> int:
    """Check ``adapter_model.safetensors`` holds exactly the expected LoRA tensors at full shape.

    Args:
        ckpt: checkpoint directory.
        expected: saved tensor name -> full shape.

    Returns:
        Number of tensors checked.

    Raises:
        IncompleteAdapterError: a tensor is missing, unexpected, zero-size or of the wrong shape.
    """
    from safetensors import safe_open

    path = Path(ckpt) / ADAPTER_WEIGHTS
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


def adapter_sha256(ckpt: str | Path) -> str:
    """sha256 of the adapter weights file (hex)."""
    with open(Path(ckpt) / ADAPTER_WEIGHTS, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_config(ckpt: str | Path) -> dict:
    """The resolved run config a checkpoint carries (``{}`` when it has none).

    Raises:
        ValueError: ``packlora_config.yaml`` is not a mapping, or its ``decoding`` section is not.
    """
    path = Path(ckpt) / CONFIG_NAME
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict) or not isinstance(config.get("decoding") or {}, dict):
        raise ValueError(f"{path}: must be a mapping whose 'decoding' is a mapping")
    return config


def read_generation_config(ckpt: str | Path) -> dict:
    """``generation_config.json`` as a dict (``{}`` when absent)."""
    path = Path(ckpt) / GENERATION_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def chat_format(ckpt: str | Path, tokenizer):
    """The ``ChatFormat`` a checkpoint was trained with (its ``data.chat_format`` settings, else detected)."""
    from packlora.data_utils.chat_format import ChatFormat

    data = run_config(ckpt).get("data") or {}
    return ChatFormat(tokenizer, data.get("chat_format") or "auto", enable_thinking=data.get("enable_thinking"),
                      train_reasoning=data.get("train_reasoning", True))


def stop_ids(ckpt: str | Path, fmt) -> list[int]:
    """The stop ids of a checkpoint: ``generation_config.json``'s ``eos_token_id``, the format's end
    of turn, the tokenizer's eos and the run's ``decoding.stop_tokens`` (``ChatFormat.stop_ids``).

    Raises:
        StopTokenError, ValueError: a stop token or eos id in the checkpoint's configs is invalid.
    """
    gen = read_generation_config(ckpt)
    if not gen:
        logger.warning("%s has no %s; stop ids come from the tokenizer and chat format only", ckpt, GENERATION_CONFIG)
    return fmt.stop_ids((run_config(ckpt).get("decoding") or {}).get("stop_tokens"), generation_config=gen)


def max_new_tokens(ckpt: str | Path, default: int = 512) -> int:
    """``decoding.max_new_tokens`` of the run config, else ``generation_config.json``'s, else ``default``.

    Raises:
        ValueError: the stored value is not a positive int.
    """
    value = (run_config(ckpt).get("decoding") or {}).get("max_new_tokens") or read_generation_config(ckpt).get("max_new_tokens")
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens in {ckpt} is {value!r}; set decoding.max_new_tokens in {CONFIG_NAME} "
                         "to a positive int")
    return value


def resolve_base_model(ckpt: str | Path) -> Path:
    """The base model directory of an adapter checkpoint, also after the run was moved.

    Tried in order: ``<ckpt>/base_model``, ``<ckpt>/../base_model`` (where packlora saves a base it
    built or merged, beside its checkpoints), then ``base_model_name_or_path`` of
    ``adapter_config.json`` (the path recorded at save time; relative paths from the working
    directory). The first that holds a ``config.json`` wins; a fallback past the recorded path is
    logged.

    Raises:
        FileNotFoundError: none of them is a model directory; the message lists the paths tried.
    """
    ckpt = Path(ckpt).resolve()
    recorded = json.loads((ckpt / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    tried = [ckpt / BASE_MODEL_DIR, ckpt.parent / BASE_MODEL_DIR] + ([Path(recorded)] if recorded else [])
    for candidate in tried:
        if (candidate / "config.json").is_file():
            if recorded and candidate.resolve() != Path(recorded).resolve():
                logger.info("base model of %s: %s (recorded as %s)", ckpt, candidate, recorded)
            return candidate
    raise FileNotFoundError(
        f"base model for adapter checkpoint {ckpt} not found; tried " + ", ".join(str(p) for p in tried)
        + f". Put the base model (config.json + weights) at {ckpt.parent / BASE_MODEL_DIR}, or point "
        f"base_model_name_or_path in {ckpt / ADAPTER_CONFIG} at it"
    )


def stored_dtype(model_dir: str | Path):
    """The torch dtype a model directory's weights are stored in (its config's ``dtype``), float32 if unsaid."""
    import torch
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    return stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored or "float32"), torch.float32)


def merge_adapter(ckpt: str | Path, base: str | Path | None = None):
    """Load the base in float32, apply the adapter of ``ckpt`` and merge it (W + alpha/r * B @ A).

    Returns:
        ``(model, dtype)``: the merged ``AutoModelForCausalLM`` (float32, on CPU) and the dtype
        the base was stored in (to cast back to before saving).

    Raises:
        FileNotFoundError: the base cannot be found (``resolve_base_model``).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = Path(base) if base is not None else resolve_base_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=False).merge_and_unload()
    return model, stored_dtype(base)


def load_model(ckpt: str | Path, dtype: Any, device: Any):
    """``(model, inner, base_path)``: the checkpoint's model in eval mode on ``device`` (a
    ``PeftModel`` on its base for an adapter checkpoint), the underlying transformers model (whose
    ``generation_config`` ``generate`` reads), and the base directory (None for a full model).

    Raises:
        FileNotFoundError: ``ckpt`` is neither an adapter nor a model directory, or its base is missing.
    """
    from transformers import AutoModelForCausalLM

    ckpt = Path(ckpt)
    if is_adapter(ckpt):
        from peft import PeftModel

        base_path = resolve_base_model(ckpt)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
        model = PeftModel.from_pretrained(base, ckpt, is_trainable=False)
        inner = model.get_base_model()
    elif (ckpt / "config.json").is_file():
        model = inner = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, use_safetensors=True)
        base_path = None
    else:
        raise FileNotFoundError(f"{ckpt} is not a checkpoint: it has neither {ADAPTER_CONFIG} (LoRA adapter) nor "
                                "config.json (full model); pass the directory that training saved")
    model.to(device).eval()
    return model, inner, base_path
