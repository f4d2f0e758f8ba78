"""Load a packlora checkpoint and generate one assistant reply per conversation.

Every row stops at the first of the checkpoint's stop ids (``<|im_end|>`` included, see
``decoding.stopping``); the stop id and anything after it is cut from the reply. Batches are
left-padded so that every row's next token is generated in the same column::

    columns:      0   1   2   3   4 ... L-1 | L    L+1  L+2   L+3        L+4
    row 0:      pad pad  p0  p1  p2 ... pk  | "Hi" "!"  <|im_end|>  pad   pad   -> "Hi!", stop_id, 3 new tokens
    row 1:       q0  q1  q2  q3  q4 ... qm  | "A"  "B"  "C"   "D"   "E"   -> "ABCDE", max_new_tokens (=5)
                 (attention_mask 0 on pad)     (generated; ``generate`` writes pad after a row stops)
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decoding.stop_strings import StopStringCriteria, StopStringMatcher
from decoding.stopping import cut_at_first_stop, format_stop_ids, resolve_stop_ids

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
STOP_REASONS = ("stop_id", "stop_string", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class Reply:
    """One generated assistant reply.

    Attributes:
        text: ``token_ids`` decoded with ``skip_special_tokens=False``: the stop is not in it, but
            any other special token the model wrote (e.g. ``<|im_start|>``) stays visible.
            After a stop string, ``text`` is cut exactly before the match.
        token_ids: the generated ids before the first stop id (the stop is cut); after a stop
            string, the ids whose text lies wholly before the match.
        stop_reason: ``"stop_id"``, ``"stop_string"`` or ``"max_new_tokens"``.
        stop_id: the stop id that ended the reply; None unless ``stop_reason == "stop_id"``.
        num_new_tokens: tokens generated, counting the stop: ``len(token_ids) + 1`` after a stop
            id, the tokens up to the one completing the match after a stop string,
            ``max_new_tokens`` otherwise.
        stop_string: the stop string that ended the reply, else None.
    """

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    stop_id: int | None
    num_new_tokens: int
    stop_string: str | None = None


@dataclass(frozen=True, slots=True)
class LoadedCheckpoint:
    """A checkpoint ready to decode, as returned by ``load_checkpoint``.

    Attributes:
        model: the causal LM in eval mode (a ``peft.PeftModel`` for an adapter checkpoint); its
            ``generation_config`` has ``eos_token_id = list(stop_ids)``.
        tokenizer: the checkpoint's tokenizer, with its chat template.
        stop_ids: from ``resolve_stop_ids`` (generation_config.json, ``<|im_end|>``, eos, and
            ``decoding.stop_tokens`` of ``packlora_config.yaml``).
        max_new_tokens: ``decoding.max_new_tokens`` of ``packlora_config.yaml``, else
            ``max_new_tokens`` of ``generation_config.json``, else 512.
        path: the checkpoint directory.
        base_model_path: the base model directory for an adapter checkpoint, else None.
    """

    model: Any
    tokenizer: Any
    stop_ids: tuple[int, ...]
    max_new_tokens: int
    path: Path
    base_model_path: Path | None = None


def resolve_base_model(checkpoint: str | Path) -> Path:
    """The base model directory of an adapter checkpoint.

    Tries ``base_model_name_or_path`` of ``adapter_config.json``, then ``<checkpoint>/../base_model``
    (where training saves a base it built from a config), and logs when it falls back.

    Raises:
        FileNotFoundError: neither is a model directory (one with a ``config.json``); the message
            lists the paths tried.
    """
    checkpoint = Path(checkpoint).resolve()
    with open(checkpoint / "adapter_config.json") as f:
        named = json.load(f).get("base_model_name_or_path")
    fallback = checkpoint.parent / "base_model"
    tried = ([Path(named)] if named else []) + [fallback]
    for i, candidate in enumerate(tried):
        if (candidate / "config.json").is_file():
            if i > 0:
                logger.warning(
                    "base model %s (base_model_name_or_path in %s) not found; using %s instead",
                    named, checkpoint / "adapter_config.json", fallback,
                )
            return candidate
    raise FileNotFoundError(
        f"base model for adapter checkpoint {checkpoint} not found; tried "
        + ", ".join(str(p) for p in tried)
        + ". Point base_model_name_or_path in adapter_config.json at the base model directory, "
        f"or put the base model (config.json + weights) at {fallback}"
    )


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> LoadedCheckpoint:
    """Load model, tokenizer and stop ids from a packlora checkpoint directory.

    Args:
        path: an adapter checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``) or a
            plain/merged model (``config.json`` + weights), with tokenizer files and, normally,
            ``generation_config.json`` and ``packlora_config.yaml``.
        dtype: weight dtype (``torch.bfloat16`` or ``"bfloat16"``...); default float32 on CPU,
            bfloat16 on CUDA.
        device: default ``"cuda"`` when available, else ``"cpu"``.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint, or an adapter's base model is missing.
        ValueError: bad stop tokens or ``max_new_tokens`` in the checkpoint's configs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)

    base_model_path = None
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_model_path = resolve_base_model(path)
        base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype, use_safetensors=True)
        model = PeftModel.from_pretrained(base, path, is_trainable=False)
        inner = model.get_base_model()
    elif (path / "config.json").is_file():
        model = inner = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    else:
        raise FileNotFoundError(
            f"{path} is not a checkpoint: it has neither adapter_config.json (LoRA adapter) nor "
            "config.json (full model); pass the directory that training saved"
        )
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    gen_path = path / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    if not generation_config:
        logger.warning("%s has no generation_config.json; stop ids come from the tokenizer only", path)
    decoding = _packlora_decoding_section(path)
    stop_ids = resolve_stop_ids(tokenizer, generation_config, decoding.get("stop_tokens") or ())

    max_new_tokens = decoding.get("max_new_tokens") or generation_config.get("max_new_tokens")
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens in {path} is {max_new_tokens!r}; set decoding.max_new_tokens in "
            "packlora_config.yaml to a positive int"
        )

    # Plain `model.generate(...)` should stop where generate_replies does.
    inner.generation_config.eos_token_id = list(stop_ids)
    inner.generation_config.pad_token_id = _pad_id(tokenizer, stop_ids)
    logger.info(
        "loaded %s%s on %s (%s); stop ids: %s; max_new_tokens %d",
        path, f" (base {base_model_path})" if base_model_path else "", device,
        str(dtype).removeprefix("torch."), format_stop_ids(tokenizer, stop_ids), max_new_tokens,
    )
    return LoadedCheckpoint(model, tokenizer, tuple(stop_ids), max_new_tokens, path, base_model_path)


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    stop_ids: Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    streamer: Any = None,
    synced_gpus: bool | None = None,
) -> list[Reply]:
    """Generate the next assistant turn of each conversation.

    Each conversation is rendered with the tokenizer's chat template and
    ``add_generation_prompt=True``, then tokenised with ``add_special_tokens=False``. Batches of
    ``batch_size`` are left-padded (see the module docstring); ``tokenizer`` is not modified.
    Decoding is exactly what the arguments say: greedy, or sampling with ``temperature`` and
    ``top_p`` only (top_k off, no repetition penalty, one beam), whatever ``model.generation_config``
    holds. The model is put in eval mode for the call and restored afterwards. Greedy replies do
    not depend on ``batch_size``; sampled ones do (the random stream is shared by the batch).

    Args:
        model: a causal LM (or ``PeftModel``); inputs go to the device of its first parameter.
        tokenizer: its tokenizer, with a chat template.
        conversations: lists of ``{"role", "content"}``; none may end with an assistant turn.
        stop_ids: ids that end a row (``resolve_stop_ids``); each row stops on its own.
        max_new_tokens: the most tokens generated per row, the stop token included.
        batch_size: conversations per ``generate`` call.
        do_sample: sample instead of greedy decoding.
        temperature, top_p: sampling settings; must stay at 1.0 unless ``do_sample``.
        seed: seeds sampling in a forked RNG (the global torch RNG is left untouched); only
            with ``do_sample``.
        stop_strings: multi-token stop strings (``decoding.stop_strings``), matched on the decoded
            text of each row; the reply is cut before the match.
        streamer: a ``generate`` streamer (``StopAwareStreamer``); needs ``batch_size`` 1.
        synced_gpus: passed to ``generate``; None lets transformers decide (True under ZeRO-3
            with several processes: every rank must then call with the same conversations).

    Returns:
        One ``Reply`` per conversation, in order (``[]`` for no conversations).

    Raises:
        ValueError: an empty conversation or one whose last message is from the assistant
            (the message gives its index), no chat template, no stop ids, or bad settings.
    """
    if not stop_ids:
        raise ValueError("stop_ids is empty; pass resolve_stop_ids(tokenizer, generation_config)")
    matcher = StopStringMatcher(stop_strings)
    if streamer is not None and batch_size != 1:
        raise ValueError(f"streaming needs batch_size=1, got {batch_size}")
    check_decoding_settings(max_new_tokens, batch_size, do_sample, temperature, top_p, seed)
    if max_new_tokens is None:
        raise ValueError("max_new_tokens must be a positive int, got None")
    for i, conv in enumerate(conversations):
        if not conv:
            raise ValueError(f"conversations[{i}] is empty; give at least one user message")
        if conv[-1].get("role") == "assistant":
            raise ValueError(
                f"conversations[{i}] ends with an assistant message, so there is nothing to reply to; "
                "strip the reference answer (the last assistant turn) before decoding"
            )
    if not conversations:
        return []
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat_template; load the tokenizer saved with the checkpoint")

    texts = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in conversations]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad_id = _pad_id(tokenizer, stop_ids)
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        do_sample=do_sample,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=None,
        return_dict_in_generate=False,
    )
    if streamer is not None:
        gen_kwargs["streamer"] = streamer
    if synced_gpus is not None:
        gen_kwargs["synced_gpus"] = synced_gpus
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0)

    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    was_training = model.training
    model.eval()
    replies: list[Reply] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), batch_size):
                batch = prompt_ids[start : start + batch_size]
                input_ids, attention_mask = _left_pad(batch, pad_id)
                criteria = {}
                if matcher:
                    from transformers import StoppingCriteriaList

                    criteria["stopping_criteria"] = StoppingCriteriaList(
                        [StopStringCriteria(matcher, tokenizer, input_ids.shape[1])]
                    )
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **gen_kwargs, **criteria
                )
                for row in out[:, input_ids.shape[1] :].tolist():
                    replies.append(_to_reply(row, stop_ids, max_new_tokens, tokenizer, matcher))
    finally:
        model.train(was_training)
    return replies


def _to_reply(
    new_ids: list[int], stop_ids: Sequence[int], max_new_tokens: int, tokenizer: Any,
    matcher: StopStringMatcher | None = None,
) -> Reply:
    kept, stop_id = cut_at_first_stop(new_ids, stop_ids)
    if matcher:
        hit = matcher.first_stop(
            kept, lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
        if hit is not None:
            return Reply(
                text=hit.text, token_ids=tuple(kept[: hit.kept_tokens]), stop_reason="stop_string", stop_id=None,
                num_new_tokens=hit.num_tokens, stop_string=hit.stop_string,
            )
    if stop_id is None and len(new_ids) != max_new_tokens:
        raise RuntimeError(
            f"generate ended a row after {len(new_ids)} tokens without a stop id (max_new_tokens="
            f"{max_new_tokens}); something in model.generation_config added another stopping rule"
        )
    return Reply(
        text=tokenizer.decode(list(kept), skip_special_tokens=False, clean_up_tokenization_spaces=False),
        token_ids=kept,
        stop_reason="max_new_tokens" if stop_id is None else "stop_id",
        stop_id=stop_id,
        num_new_tokens=max_new_tokens if stop_id is None else len(kept) + 1,
    )


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(rows), max_len)`` int64, padding on the left."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask


def _pad_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    # Pad positions are masked in the prompt and come after the stop in the reply, so a stop id
    # is a safe pad when the tokenizer has none.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


def check_decoding_settings(
    max_new_tokens: int | None, batch_size: int, do_sample: bool, temperature: float, top_p: float, seed: int | None
) -> None:
    """Raise one ValueError listing every bad ``generate_replies`` setting (None = not chosen yet)."""
    problems = []
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        problems.append(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive int, got {batch_size!r}")
    if do_sample:
        if not temperature > 0:
            problems.append(
                f"temperature must be > 0 when sampling, got {temperature!r}; use do_sample=False for greedy"
            )
        if not 0 < top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {top_p!r}")
    else:
        for name, value, default in (("temperature", temperature, 1.0), ("top_p", top_p, 1.0), ("seed", seed, None)):
            if value != default:
                problems.append(f"{name}={value!r} only applies when sampling; set do_sample=True or drop {name}")
    if problems:
        raise ValueError("bad decoding settings: " + "; ".join(problems))


def _packlora_decoding_section(path: Path) -> dict:
    config_path = path / "packlora_config.yaml"
    if not config_path.is_file():
        return {}
    import yaml

    config = yaml.safe_load(config_path.read_text()) or {}
    decoding = (config.get("decoding") or {}) if isinstance(config, dict) else {}
    if not isinstance(decoding, dict):
        raise ValueError(f"{config_path}: 'decoding' must be a mapping, got {type(decoding).__name__}")
    return decoding
