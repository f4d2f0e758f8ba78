"""Load a packlora checkpoint and generate one assistant reply per conversation.

Every row stops at the first of the checkpoint's stop ids (the chat format's end of turn
included, ``EOT`` below); the stop id and anything after it is cut from the reply. Batches are
left-padded so that every row's next token is generated in the same column::

    columns:      0   1   2   3   4 ... L-1 | L    L+1  L+2   L+3   L+4
    row 0:      pad pad  p0  p1  p2 ... pk  | "Hi" "!"  EOT   pad   pad   -> "Hi!", stop_id, 3 new tokens
    row 1:       q0  q1  q2  q3  q4 ... qm  | "A"  "B"  "C"   "D"   "E"   -> "ABCDE", max_new_tokens (=5)
                 (attention_mask 0 on pad)     (generated; ``generate`` writes pad after a row stops)
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from packlora.core import checkpoint as ckpt_format
from packlora.core.errors import InputError
from packlora.decoding.stop_strings import StopStringMatcher
from packlora.decoding.stopping import cut_at_first_stop

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = ckpt_format.DEFAULT_MAX_NEW_TOKENS
STOP_REASONS = ("stop_id", "stop_string", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class Reply:
    """One generated assistant reply.

    Attributes:
        text: ``token_ids`` decoded with ``skip_special_tokens=False``: the stop is not in it, but
            any other special token the model wrote (e.g. a role header's start) stays visible.
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
        fmt: the chat format over the checkpoint's tokenizer (``fmt.tokenizer``).
        stop_ids: ``core.checkpoint.CheckpointInfo.stop_ids``: generation_config.json, the end of turn, eos,
            and ``decoding.stop_tokens`` of ``packlora_config.yaml``.
        max_new_tokens: ``decoding.max_new_tokens`` of ``packlora_config.yaml``, else
            ``max_new_tokens`` of ``generation_config.json``, else 512.
        path: the checkpoint directory.
        base_model_path: the base model directory for an adapter checkpoint, else None.
    """

    model: Any
    fmt: Any
    stop_ids: tuple[int, ...]
    max_new_tokens: int
    path: Path
    base_model_path: Path | None = None

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer, with its chat template."""
        return self.fmt.tokenizer


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    """How each next token is chosen: greedy (the default) or sampled, built once from the command
    line (``decoding.cli.sampling_settings``) and passed through unchanged. Validates itself: one
    ``InputError`` lists every bad field.

    Qwen2.5-Instruct's ``generation_config.json`` samples with
    ``Sampling(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)``.

    Example:
        >>> Sampling().describe()
        'greedy'
        >>> Sampling(do_sample=True, temperature=0.7, seed=3).for_offset(8).seed
        11
        >>> Sampling(temperature=0.7)
        Traceback (most recent call last):
        ...
        packlora.core.errors.InputError: bad decoding settings: temperature=0.7 only applies when sampling; set do_sample=True or drop temperature
    """

    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Divides the logits before sampling; > 0, and 1.0 unless ``do_sample``."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: sample among the most likely tokens whose probabilities add up to it."""
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens only; 0 = off, and 0 unless ``do_sample``."""
    repetition_penalty: float = 1.0
    """> 0; 1.0 = off; greedy or sampling. The logit of every token already in the row (prompt
    included) is divided by it when positive, multiplied when negative (Keskar et al. 2019, "CTRL",
    arXiv:1909.05858, eq. 3; ``transformers.RepetitionPenaltyLogitsProcessor``)."""
    seed: int | None = None
    """Seeds sampling in a forked RNG (the global torch RNG is left untouched); None unless ``do_sample``."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InputError("bad decoding settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every bad field, each naming it and its value."""
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        problems = [f"{name} must be a number, got {getattr(self, name)!r}" for name in ("temperature", "top_p")
                    if not number(getattr(self, name))]
        if not isinstance(self.do_sample, bool):
            problems.append(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed must be an int or None, got {self.seed!r}")
        if problems:
            return problems
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        penalty = self.repetition_penalty
        if not (number(penalty) and penalty > 0):
            problems.append(f"repetition_penalty must be > 0 (1.0 = off), got {penalty!r}")
        if self.do_sample:
            if not self.temperature > 0:
                problems.append(
                    f"temperature must be > 0 when sampling, got {self.temperature!r}; use do_sample=False for greedy"
                )
            if not 0 < self.top_p <= 1:
                problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        else:
            for name, default in (("temperature", 1.0), ("top_p", 1.0), ("seed", None), ("top_k", 0)):
                value = getattr(self, name)
                if value != default:
                    problems.append(f"{name}={value!r} only applies when sampling; set do_sample=True or drop {name}")
        return problems

    def for_offset(self, offset: int) -> "Sampling":
        """The settings for a batch whose first prompt is number ``offset``: the seed moved by it."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + offset)

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``model.generate`` keywords these settings fix (the seed is applied by the caller)."""
        kwargs: dict[str, Any] = dict(do_sample=self.do_sample, repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=None, typical_p=1.0)
        return kwargs

    def describe(self) -> str:
        """One phrase for logs: ``greedy`` or ``sampling (temperature …)``, plus the penalty when on."""
        mode = (f"sampling (temperature {self.temperature}, top_p {self.top_p}, top_k {self.top_k}, seed {self.seed})"
                if self.do_sample else "greedy")
        return mode + (f", repetition_penalty {self.repetition_penalty}" if self.repetition_penalty != 1.0 else "")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what ``eval-runaway`` writes under ``"decoding"``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


GREEDY = Sampling()
"""Greedy decoding, no repetition penalty: the default everywhere."""


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
        MissingPathError: ``path`` is not a checkpoint, or an adapter's base model is missing.
        InputError: bad stop tokens or ``max_new_tokens`` in the checkpoint's configs, or an unknown dtype.
    """
    from transformers import AutoTokenizer

    from packlora.data_utils.chat_format import ChatFormat

    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InputError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    info = ckpt_format.CheckpointInfo.read(path)
    model, inner, base_model_path = ckpt_format.load_model(info, dtype, device)
    fmt = ChatFormat(AutoTokenizer.from_pretrained(path), **info.format_options)
    stop_ids = info.stop_ids(fmt)
    max_new_tokens = info.max_new_tokens(DEFAULT_MAX_NEW_TOKENS)
    ckpt_format.set_stop_ids(inner, stop_ids, fmt.pad_id(stop_ids))  # plain `model.generate()` stops here too
    inherited = model_stop_strings(inner)
    logger.info(
        "loaded %s%s on %s (%s); chat format %s; stop ids: %s; max_new_tokens %d%s",
        path, f" (base {base_model_path})" if base_model_path else "", device,
        str(dtype).removeprefix("torch."), fmt.name, fmt.format_ids(stop_ids), max_new_tokens,
        f"; stop strings of its generation config: {list(inherited)}" if inherited else "",
    )
    return LoadedCheckpoint(model, fmt, tuple(stop_ids), max_new_tokens, path, base_model_path)


def generate_replies(
    model: Any,
    fmt: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    stop_ids: Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    sampling: Sampling = GREEDY,
    stop_strings: Sequence[str] = (),
    streamer: Any = None,
    synced_gpus: bool | None = None,
) -> list[Reply]:
    """Generate the next assistant turn of each conversation.

    Each conversation is rendered with the chat template and ``add_generation_prompt=True`` and
    tokenised with its messages' text kept as text (``ChatFormat.encode_prompt``). Batches of
    ``batch_size`` are left-padded (see the module docstring); ``tokenizer`` is not modified.
    Decoding is exactly what ``sampling`` says (greedy by default), with one beam, whatever
    ``model.generation_config`` holds. The model is put in eval mode for the call and restored
    afterwards. Greedy replies do
    not depend on ``batch_size``; sampled ones do (the random stream is shared by the batch).

    Args:
        model: a causal LM (or ``PeftModel``); inputs go to the device of its first parameter.
        fmt: the ``ChatFormat`` over its tokenizer.
        conversations: lists of ``{"role", "content"}``; none may end with an assistant turn.
        stop_ids: ids that end a row (``ChatFormat.stop_ids``); each row stops on its own.
        max_new_tokens: the most tokens generated per row, the stop token included.
        batch_size: conversations per ``generate`` call.
        sampling: greedy or sampled decoding, repetition penalty and seed (``Sampling``).
        stop_strings: multi-token stop strings (``decoding.stop_strings``), matched on the decoded
            text of each row; the reply is cut before the match. The model's own
            ``generation_config.stop_strings`` (``model_stop_strings``) are honoured too.
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
        raise ValueError("stop_ids is empty; pass fmt.stop_ids() or the checkpoint's stop ids")
    tokenizer = fmt.tokenizer
    # the caller's stop strings, and the model's own (a base's generation_config.json may list some)
    matcher = StopStringMatcher([*StopStringMatcher(stop_strings).stop_strings, *model_stop_strings(model)])
    if streamer is not None and batch_size != 1:
        raise InputError(f"streaming needs batch_size=1, got {batch_size}")
    check_decoding_settings(max_new_tokens, batch_size, sampling)
    if max_new_tokens is None:
        raise InputError("max_new_tokens must be a positive int, got None")
    for i, conv in enumerate(conversations):
        if not conv:
            raise InputError(f"conversations[{i}] is empty; give at least one user message")
        if conv[-1].get("role") == "assistant":
            raise InputError(
                f"conversations[{i}] ends with an assistant message, so there is nothing to reply to; "
                "strip the reference answer (the last assistant turn) before decoding"
            )
    if not conversations:
        return []
    prompt_ids = [fmt.encode_prompt(list(c)) for c in conversations]
    pad_id = fmt.pad_id(stop_ids)
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        num_beams=1,
        num_return_sequences=1,
        no_repeat_ngram_size=0,
        min_new_tokens=None,
        return_dict_in_generate=False,
        **sampling.generate_kwargs(),
    )
    if streamer is not None:
        gen_kwargs["streamer"] = streamer
    if synced_gpus is not None:
        gen_kwargs["synced_gpus"] = synced_gpus

    if matcher:  # transformers' own criterion (one tensor check per step) stops the row...
        # ...and needs the tokenizer whenever any stop string is active, the model's own included
        # ("could not locate a tokenizer" otherwise: transformers #34571)
        gen_kwargs.update(stop_strings=list(matcher.stop_strings), tokenizer=tokenizer)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    was_training = model.training
    model.eval()
    replies: list[Reply] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompt_ids), batch_size):
                batch = _left_padded(tokenizer, prompt_ids[start : start + batch_size], pad_id)
                out = model.generate(**{k: v.to(device) for k, v in batch.items()}, **gen_kwargs)
                width = batch["input_ids"].shape[1]
                for row, prompt in zip(out[:, width:].tolist(), prompt_ids[start : start + batch_size]):
                    replies.append(_to_reply(row, stop_ids, max_new_tokens, tokenizer, matcher, prompt))
    finally:
        model.train(was_training)
    return replies


def model_stop_strings(model: Any) -> tuple[str, ...]:
    """The stop strings ``model.generation_config`` carries (``stop_strings``, a string or a list:
    some published bases list them in ``generation_config.json``); ``()`` when none.

    ``generate`` applies them whatever its arguments, so the decoder matches and cuts them like its
    own (``generate_replies``).
    """
    value = getattr(getattr(model, "generation_config", None), "stop_strings", None)
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _to_reply(new_ids: list[int], stop_ids: Sequence[int], max_new_tokens: int, tokenizer: Any,
              matcher: StopStringMatcher | None = None, prompt: Sequence[int] = ()) -> Reply:
    """...and packlora's matcher cuts the text where the stop string starts (``first_stop``)."""
    kept, stop_id = cut_at_first_stop(new_ids, stop_ids)
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    if matcher:
        hit = matcher.first_stop(kept, decode)
        if hit is not None:
            return Reply(
                text=hit.text, token_ids=tuple(kept[: hit.kept_tokens]), stop_reason="stop_string", stop_id=None,
                num_new_tokens=hit.num_tokens, stop_string=hit.stop_string,
            )
        if stop_id is None and len(new_ids) < max_new_tokens:
            # transformers also stops at a stop string that begins in the prompt's last characters
            tail = decode(list(prompt[-8:]) + list(kept))
            string = next((s for s in matcher.stop_strings if s in tail), None)
            if string is not None:
                return Reply(text=decode(kept), token_ids=tuple(kept), stop_reason="stop_string", stop_id=None,
                             num_new_tokens=len(kept), stop_string=string)
    if stop_id is None and len(new_ids) != max_new_tokens:
        raise RuntimeError(
            f"generate ended a row after {len(new_ids)} tokens without a stop id (max_new_tokens="
            f"{max_new_tokens}); something in model.generation_config added another stopping rule"
        )
    return Reply(
        text=decode(kept),
        token_ids=kept,
        stop_reason="max_new_tokens" if stop_id is None else "stop_id",
        stop_id=stop_id,
        num_new_tokens=max_new_tokens if stop_id is None else len(kept) + 1,
    )


def _left_padded(tokenizer: Any, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``, ``[len(rows), longest]`` int64, padded on the left with
    ``pad_id`` by the tokenizer's own ``pad`` (on a shallow copy when it has no pad token of its own)."""
    import copy

    if tokenizer.pad_token_id != pad_id:
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    return tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt",
                         return_attention_mask=True)


def check_decoding_settings(max_new_tokens: int | None, batch_size: int, sampling: Sampling = GREEDY) -> None:
    """Raise one ``InputError`` listing every bad ``generate_replies`` setting (None = not chosen yet).
    ``sampling`` was checked when built; a value of another type is refused here."""
    problems = []
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        problems.append(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(sampling, Sampling):
        problems.append(f"sampling must be a decoding.generate.Sampling, got {type(sampling).__name__}")
    if problems:
        raise InputError("bad decoding settings: " + "; ".join(problems))
