"""Runaway metrics: does a chat model end its turn, or run on into a turn it invents?

A reply *runs away* when, after its answer, the model goes on to write the next turn itself
(the end of turn, then a new role header such as ChatML's ``START user\\n``, or, with special
tokens skipped, a bare ``\\nuser\\n``) or never stops at all. Loss curves do not show it; these
metrics do. Control tokens, the end of turn and the role header come from the chat format
(``data_utils.chat_format.ChatFormat``). For one prompt:

``stopped_by_stop_id``
    The decoder stopped at one of its stop ids (``Reply.stop_reason == "stop_id"``).
``emitted_end_of_turn``
    The model wrote the end-of-turn token right after its answer, whether or not the decoder
    stopped there: among the generated tokens (the stop token included), the first control token
    is the end of turn, and the text before it has no role leak. This measures what training
    taught, independently of the stop ids.
``hit_max_new_tokens``
    The reply ended because ``max_new_tokens`` were generated, not at a stop.
``role_leak``
    The visible reply (the text the decoder returns, i.e. cut before the stop) contains a role
    marker, checked twice: rendered with special tokens (the role-header start token anywhere)
    and with special tokens skipped (a line that is exactly ``system``, ``user`` or ``assistant``
    followed by a newline, as a ChatML header becomes once its start token is hidden).
``runaway``
    ``hit_max_new_tokens or role_leak``; each runaway is one of two kinds:
``loop``
    The reply never ended (``hit_max_new_tokens``) and wrote no new turn (not ``role_leak``).
    ``repeated_unit`` names the unit its end repeats, when there is one (``repeated_unit``).
``length_ratio``
    Characters of the visible reply (special tokens skipped, whitespace stripped at both ends)
    divided by the characters of the reference answer (stripped); only for prompts whose
    reference is non-empty.

The report gives each boolean as a rate over the prompts (a float in [0, 1]) and the mean of
``length_ratio``. Example::

    >>> has_role_leak("Hi!\\nuser\\nMore?"), has_role_leak("Hi!<start>", "<start>"), has_role_leak("users\\n")
    (True, True, False)
    >>> repeated_unit("王曰：何如？何如？何如？何如？何如？何如？何")
    RepeatedUnit(unit='何如？', repeats=6, chars=19)
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from packlora.core.errors import InputError
from packlora.decoding.generate import GREEDY, Reply, Sampling, generate_replies

ROLE_LINE = re.compile(r"(?:^|\n)(?:system|user|assistant)\n")
"""A role name alone on a line: what a ChatML role header looks like with special tokens skipped."""
NUM_WORST = 5
LOOP_MIN_REPEATS = 3
LOOP_MIN_CHARS = 12


def has_role_leak(text: str, header_start: str | None = None) -> bool:
    """True if ``text`` contains the chat format's role-header start token (``header_start``) or a
    line that is just a role name."""
    return (header_start is not None and header_start in text) or ROLE_LINE.search(text) is not None


@dataclass(frozen=True, slots=True)
class RepeatedUnit:
    """The end of a reply is ``unit`` repeated: ``chars`` characters long, ``repeats`` whole units
    (a last, partial unit, cut by ``max_new_tokens``, counts in ``chars`` only)."""

    unit: str
    repeats: int
    chars: int


def repeated_unit(
    text: str, min_repeats: int = LOOP_MIN_REPEATS, min_chars: int = LOOP_MIN_CHARS
) -> RepeatedUnit | None:
    """The shortest unit whose repetition the end of ``text`` is, or None.

    For each period p = 1, 2, ..., the p-periodic tail of ``text`` is the longest suffix with
    ``tail[i] == tail[i + p]`` throughout; the first p whose tail holds at least ``min_repeats``
    whole units and at least ``min_chars`` characters wins (so ``"哈哈哈"`` is no loop, but 12 ``王``
    in a row are). ``unit`` is the tail's first p characters; it may straddle a special token
    written out as text (``"何如？<|im_end|>"``). Each period's scan stops at its first mismatch,
    so a reply of a few thousand characters costs little.

    >>> repeated_unit("王谓谢曰：" + "王、" * 7 + "王")
    RepeatedUnit(unit='王、', repeats=7, chars=15)
    >>> repeated_unit("孙秀既恨石崇不与绿珠。") is None
    True
    """
    n = len(text)
    for p in range(1, n // min_repeats + 1):
        i = n - p - 1  # extend the periodic tail leftwards while text[i] == text[i + p]
        while i >= 0 and text[i] == text[i + p]:
            i -= 1
        chars = n - 1 - i
        if chars // p >= min_repeats and chars >= min_chars:
            return RepeatedUnit(text[i + 1 : i + 1 + p], chars // p, chars)
    return None


def naive_stop_ids(fmt: Any) -> list[int]:
    """The stop ids of a decoder that knows nothing about chat turns: ``tokenizer.eos_token_id``
    only (end of text, not end of turn, for Qwen2 base tokenizers). What ``--no-stop-ids`` decodes with.

    Raises:
        ValueError: the tokenizer has no eos token, or its eos is the end of turn itself (then there
            is no chat-unaware decoder to reproduce).
    """
    eos = fmt.tokenizer.eos_token_id
    if eos is None or eos == fmt.end_of_turn_id:
        raise InputError(
            f"--no-stop-ids decodes with the tokenizer's eos token only, but it is {fmt.tokenizer.eos_token!r}, the "
            "end of turn itself; this experiment needs a tokenizer whose eos is not (e.g. a Qwen2 base tokenizer)"
        )
    return [eos]


@dataclass(frozen=True, slots=True)
class PromptResult:
    """The metrics of one prompt (see the module docstring for each definition)."""

    source: str
    reply: str
    reference: str | None
    stop_reason: str
    num_new_tokens: int
    stopped_by_stop_id: bool
    emitted_end_of_turn: bool
    hit_max_new_tokens: bool
    role_leak: bool
    runaway: bool
    length_ratio: float | None
    loop: bool = False
    repeated_unit: str | None = None


@dataclass(frozen=True)
class RunawayReport:
    """Rates over ``num_prompts`` prompts (floats in [0, 1]) and the mean length ratio.

    Attributes:
        stop_ids: the ids the decoder stopped at.
        no_stop_ids: True when decoded with ``naive_stop_ids`` (the bug's decoder), not the
            checkpoint's stop ids.
        worst: up to 5 ``PromptResult`` dicts, runaways first, then by length ratio.
    """

    num_prompts: int
    max_new_tokens: int
    stop_ids: list[int]
    no_stop_ids: bool
    stopped_by_stop_id: float
    emitted_end_of_turn: float
    hit_max_new_tokens: float
    role_leak: float
    runaway: float
    mean_length_ratio: float | None
    worst: list[dict] = field(default_factory=list)
    loop: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        """The rates and mean ratio, named ``runaway/<metric>`` (for TensorBoard)."""
        names = ("stopped_by_stop_id", "emitted_end_of_turn", "hit_max_new_tokens", "role_leak", "loop", "runaway",
                 "mean_length_ratio")
        return {f"runaway/{n}": getattr(self, n) for n in names if getattr(self, n) is not None}


def score_reply(reply: Reply, reference: str | None, fmt: Any, source: str = "") -> PromptResult:
    """The per-prompt metrics of one ``Reply`` under the chat format ``fmt`` (definitions in the
    module docstring).

    A reply that stopped at the end of turn emitted it; one decoded without chat stop ids emitted
    it if the end of turn is the first control token among its ``token_ids``.
    """
    tokenizer, header = fmt.tokenizer, fmt.spec.header_start
    tokens = list(reply.token_ids) + ([reply.stop_id] if reply.stop_id is not None else [])
    emitted_eot = False
    for i, t in enumerate(tokens):
        if t in fmt.control_ids:
            before = tokenizer.decode(tokens[:i], skip_special_tokens=False)
            emitted_eot = t == fmt.end_of_turn_id and not has_role_leak(before, header)
            break
    visible = tokenizer.decode(list(reply.token_ids), skip_special_tokens=True)
    if reply.stop_reason == "stop_string":  # token_ids end before the match; text is cut exactly
        visible = reply.text
    leak = has_role_leak(reply.text, header) or has_role_leak(visible, header)
    hit_max = reply.stop_reason == "max_new_tokens"
    ratio = None
    if reference and reference.strip():
        ratio = len(visible.strip()) / len(reference.strip())
    unit = repeated_unit(reply.text) if hit_max else None
    return PromptResult(
        source=source, reply=reply.text, reference=reference, stop_reason=reply.stop_reason,
        num_new_tokens=reply.num_new_tokens, stopped_by_stop_id=reply.stop_reason == "stop_id",
        emitted_end_of_turn=emitted_eot, hit_max_new_tokens=hit_max, role_leak=leak, runaway=hit_max or leak,
        length_ratio=ratio, loop=hit_max and not leak, repeated_unit=unit.unit if unit else None,
    )


def summarize(results: Sequence[PromptResult], stop_ids: Sequence[int], max_new_tokens: int,
              no_stop_ids: bool) -> RunawayReport:
    """Aggregate per-prompt results into a ``RunawayReport``.

    Raises:
        ValueError: no results.
    """
    if not results:
        raise InputError("no prompts to evaluate; give at least one held-out chat")
    n = len(results)

    def rate(name: str) -> float:
        return sum(bool(getattr(r, name)) for r in results) / n

    ratios = [r.length_ratio for r in results if r.length_ratio is not None]
    worst = sorted(results, key=lambda r: (not r.runaway, -(r.length_ratio or 0.0)))[:NUM_WORST]
    return RunawayReport(
        num_prompts=n, max_new_tokens=max_new_tokens, stop_ids=list(stop_ids), no_stop_ids=no_stop_ids,
        stopped_by_stop_id=rate("stopped_by_stop_id"), emitted_end_of_turn=rate("emitted_end_of_turn"),
        hit_max_new_tokens=rate("hit_max_new_tokens"), role_leak=rate("role_leak"), runaway=rate("runaway"),
        loop=rate("loop"), mean_length_ratio=sum(ratios) / len(ratios) if ratios else None,
        worst=[asdict(r) for r in worst],
    )


def evaluate_runaway(
    model: Any,
    fmt: Any,
    prompts: Sequence[tuple[Sequence[dict], str | None, str]],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    *,
    no_stop_ids: bool = False,
    batch_size: int = 8,
    synced_gpus: bool | None = None,
    sampling: Sampling = GREEDY,
    stop_strings: Sequence[str] = (),
) -> RunawayReport:
    """Decode every prompt (greedily unless ``sampling`` says otherwise) and measure the runaway metrics.

    Args:
        model, fmt: as for ``generate_replies``.
        prompts: ``(messages, reference, source)`` triples; ``messages`` ends before the answer.
        stop_ids: the checkpoint's stop ids; ignored when ``no_stop_ids``.
        max_new_tokens: tokens per reply before it counts as ``hit_max_new_tokens``.
        no_stop_ids: decode with ``naive_stop_ids(fmt)`` instead (experiments only).
        batch_size: prompts per ``generate`` call.
        synced_gpus: see ``generate_replies`` (ZeRO-3 with several ranks).
        sampling: a ``Sampling``, passed to ``generate_replies`` (default: greedy, no penalty).
        stop_strings: multi-token stop strings (``decoding.stop_strings``), as ``decode --stop-string``.

    Returns:
        The ``RunawayReport``.
    """
    used = naive_stop_ids(fmt) if no_stop_ids else list(stop_ids)
    replies = generate_replies(
        model, fmt, [list(m) for m, _, _ in prompts], used, max_new_tokens=max_new_tokens,
        batch_size=batch_size, synced_gpus=synced_gpus, sampling=sampling, stop_strings=stop_strings,
    )
    results = [score_reply(r, ref, fmt, src) for r, (_, ref, src) in zip(replies, prompts, strict=True)]
    return summarize(results, used, max_new_tokens, no_stop_ids)
