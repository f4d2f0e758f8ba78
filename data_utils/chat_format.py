"""One chat-format object: how a chat becomes token ids and labels, and which ids matter.

``ChatFormat`` is the single home of everything that depends on how a model's chats look.
Training, the label audit, decoding, export and the runaway metrics all ask it:

* **rendering and tokenising** a chat with the tokenizer's own chat template (``encode_chat``,
  ``encode_prompt``), with the text of every message kept as text (``control tokens only from the
  template``, below);
* **which ids are control tokens** (``control_ids``) and where a role header sits
  (``header_positions``);
* **the end of a turn** (``end_of_turn_id``), the **stop ids** (``stop_ids``: strings resolved
  once, with one error text) and the **pad id** (``pad_id``);
* **how a prompt is split from its reference reply** (``split_reference``).

The known formats are detected from the tokenizer (``detect_format``), or named in the config
(``data.chat_format``):

========= ============================================== =========================== ==============
format    a turn                                         end of turn / end of text   role header
========= ============================================== =========================== ==============
chatml    ``<|im_start|>role\\n…<|im_end|>\\n``            ``<|im_end|>`` /            ``<|im_start|>role\\n``
          (Qwen2, Qwen2.5)                               ``<|endoftext|>``
qwen3     chatml, plus ``<think>\\n…\\n</think>\\n\\n``      as chatml                   as chatml
          before the reply of the turn being answered
llama3    ``<|start_header_id|>role<|end_header_id|>``   ``<|eot_id|>`` /            ``<|start_header_id|>
          ``\\n\\n…<|eot_id|>``                             ``<|end_of_text|>``         role<|end_header_id|>\\n\\n``
generic   whatever the template renders                  the tokenizer's eos / –     unknown
========= ============================================== =========================== ==============

**Training tokens are inference tokens.** At inference the model sees the generation prompt
(ending with the assistant header), tokenised on its own, and then writes its reply. A training
example is built the same way: the template renders ``messages[:i]`` with the generation prompt
and ``messages[:i + 1]`` for every assistant message ``i``; their difference is the reply's text,
the rest is prompt text, and each piece is tokenised on its own and the ids concatenated::

    piece      <|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nU<|im_end|>\\n<|im_start|>assistant\\n | Reply<|im_end|>\\n
    labels     -100 ......................................................................... -100 | Reply<|im_end|> -100

Only the reply and its closing end-of-turn are trained. A reply that starts with a newline is
trained from its own newline token: the header's ``\\n`` and the reply's ``\\n`` are separate
tokens, as at inference, instead of one ``\\n\\n`` that would straddle the boundary. When the
template renders earlier turns differently once a later turn exists (Qwen3 strips earlier
reasoning), one rendering cannot serve every turn: the chat becomes one example per assistant
turn (``EncodedChat.per_turn``), each turn in the context the model sees when it writes it. A
template that does not render a reply as an extension of its generation prompt cannot be split
at all: ``LabelError`` (reason ``template_mismatch``) names the example.

As an audit, not a gate, the concatenated ids of each example are decoded and compared with the
template's rendering of the same messages (``EncodedChat.render_mismatch``); the data report
counts the chats where they differ.

**Control tokens only from the template.** The text of a message is tokenised as text: a user
message containing ``<|im_end|>`` yields the characters ``<|im_end|>``, never the control token,
so it can neither forge a turn nor put a control token into the labels. Control tokens are those
of transformers' ``apply_chat_template(sanitize_control_tokens=True)``: the tokenizer's special
tokens, those in ``tokenizer.chat_control_tokens``, and the added tokens the template's text
contains. As there, control-token text in messages is marked before rendering; unlike there,
the text between two template control tokens is then encoded in one piece, so the characters
around a spelled control token tokenise as the same text would anywhere else (``Use <|``
keeps its ``" <|"`` token).

Example (the real Qwen2 tokenizer)::

    >>> from transformers import AutoTokenizer
    >>> fmt = ChatFormat(AutoTokenizer.from_pretrained("../shared/assets/qwen2-tokenizer"))
    >>> fmt.name, fmt.end_of_turn_id, fmt.stop_ids()
    ('chatml', 151645, [151645, 151643])
    >>> [ex] = fmt.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]).examples
    >>> fmt.tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
    'Yes.<|im_end|>'
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from packlora.core.errors import InputError
from packlora.data_utils.types import IGNORE_INDEX, Segment

FormatName = Literal["auto", "chatml", "qwen3", "llama3", "generic"]
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # private-use: around control-token text in messages
FORMAT_NAMES: tuple[str, ...] = FormatName.__args__  # type: ignore[attr-defined]
ROLE_NAMES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """What packlora knows about one chat format (the rows of the module docstring's table).

    Attributes:
        end_of_turn: the token that closes every turn; None: the tokenizer's eos token.
        end_of_text: a second stop token the model may emit at the end of a document, or None.
        header_start: the control token that opens a role header, or None when unknown.
        header_end: the control token that closes the header, or None: the header ends with the
            first token whose text contains a newline (ChatML's ``<|im_start|>user\\n``).
        reasoning_tags: ``(open, close)`` of a reasoning block inside an assistant reply, or None.
    """

    end_of_turn: str | None
    end_of_text: str | None
    header_start: str | None
    header_end: str | None
    reasoning_tags: tuple[str, str] | None = None


SPECS: dict[str, FormatSpec] = {
    "chatml": FormatSpec("<|im_end|>", "<|endoftext|>", "<|im_start|>", None),
    "qwen3": FormatSpec("<|im_end|>", "<|endoftext|>", "<|im_start|>", None, ("<think>", "</think>")),
    "llama3": FormatSpec("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
    "generic": FormatSpec(None, None, None, None),
}


LABEL_REASONS = ("template_mismatch", "no_end_of_turn", "reasoning_with_thinking_off", "template_error")
"""Slugs of ``LabelError.reason``: why a chat cannot be labelled (an error, or a counted skip)."""


class LabelError(InputError):
    """A chat that cannot be labelled exactly. ``reason`` is the data report's slug for it, one of
    ``LABEL_REASONS``."""

    def __init__(self, message: str, reason: str):
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):  # rebuilt from its fields when a tokenising worker sends it back
        return type(self), (str(self), self.reason)


class StopTokenError(InputError):
    """A stop token string that is not exactly one token of the tokenizer."""


@dataclass(frozen=True, slots=True)
class EncodedChat:
    """The labelled examples of one chat (``ChatFormat.encode_chat``).

    Attributes:
        examples: one ``Segment`` per example: usually one per chat; one per assistant turn when
            ``per_turn`` (see the module docstring). None for an example left untokenised because it
            is certainly over ``encode_chat``'s ``max_length``.
        per_turn: the template renders earlier turns differently once a later turn exists, so the
            chat was split into one example per assistant turn.
        render_mismatch: for how many examples the decoded ids differ from the template's own
            rendering of the same messages (an audit: such examples are still trained).
        control_text_messages: messages whose content (or reasoning) spells a control token,
            which was tokenised as text.
        turns_per_example: the assistant turns trained in each example (one end of turn each).
    """

    examples: tuple[Segment | None, ...]
    turns_per_example: tuple[int, ...]
    per_turn: bool = False
    render_mismatch: int = 0
    control_text_messages: int = 0


@dataclass(frozen=True)
class _ChatPlan:
    """A chat rendered and split, before the tokenizer (``ChatFormat._plan_chat``): per example its
    pieces (None: certainly too long), index of its last message and rendering; the chat's messages
    (``plain``), whether they spell no control token (``unmarked``), and its counts."""

    example: str
    pieces: tuple[list[tuple[str, bool]] | None, ...]
    ends: tuple[int, ...]
    renders: tuple[str, ...]
    plain: list[dict]
    unmarked: bool
    turns_per_example: tuple[int, ...]
    control_text: int


def detect_format(tokenizer: Any) -> str:
    """The known format a tokenizer's chat template writes (``chatml``, ``qwen3``, ``llama3``), else
    ``generic``.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    template = _template(tokenizer)
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in template and "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "qwen3" if "<think>" in template and "reasoning_content" in template else "chatml"
    if "<|start_header_id|>" in template and "<|eot_id|>" in vocab:
        return "llama3"
    return "generic"


class ChatFormat:
    """A tokenizer's chat format: rendering, labels, control tokens, stop and pad ids.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        name: one of ``FORMAT_NAMES``; ``auto`` detects it (``detect_format``).
        enable_thinking: qwen3 only: passed to the template (None: the template's default, on).
            With thinking off, a reply that carries reasoning is a ``LabelError``.
        train_reasoning: qwen3 only: whether the reasoning block of a trained reply is trained
            (True) or only context (False, label -100).

    Raises:
        ValueError: unknown ``name``, no chat template, a named format whose tokens the tokenizer
            lacks, or no end-of-turn token at all (generic format without an eos token).
    """

    def __init__(self, tokenizer: Any, name: str = "auto", *, enable_thinking: bool | None = None,
                 train_reasoning: bool = True):
        if name not in FORMAT_NAMES:
            raise InputError(f"data.chat_format: {name!r} is not one of {list(FORMAT_NAMES)}")
        template = _template(tokenizer)
        self.tokenizer = tokenizer
        self.name = detect_format(tokenizer) if name == "auto" else name
        self.spec = SPECS[self.name]
        self.enable_thinking = enable_thinking
        self.train_reasoning = train_reasoning
        vocab = tokenizer.get_vocab()
        missing = [t for t in (self.spec.end_of_turn, self.spec.header_start, self.spec.header_end) if t and t not in vocab]
        if missing:
            raise InputError(f"data.chat_format: {self.name} needs the tokens {missing}, which this tokenizer lacks; "
                             "use chat_format: auto (detected: " + detect_format(tokenizer) + ")")
        if self.spec.end_of_turn is not None:
            self.end_of_turn_id = vocab[self.spec.end_of_turn]
        elif tokenizer.eos_token_id is not None:
            self.end_of_turn_id = tokenizer.eos_token_id
        else:
            raise InputError("the tokenizer has no eos token and its chat format is unknown, so no token ends a turn; "
                             "set the tokenizer's eos_token to the token its template closes a turn with")
        self.control_tokens = _control_tokens(tokenizer, template)
        self.control_ids = frozenset(vocab[t] for t in self.control_tokens)
        self._control_re = _alternation(self.control_tokens)
        self._template_control_re = re.compile(f"(?<!{_MARK_START})({self._control_re.pattern})")
        self._control_id = {t: vocab[t] for t in self.control_tokens}
        self._added_re = _alternation(tok.content for tok in tokenizer.added_tokens_decoder.values())
        self._header_start_id = vocab.get(self.spec.header_start) if self.spec.header_start else None
        self._header_end_id = vocab.get(self.spec.header_end) if self.spec.header_end else None
        tags = self.spec.reasoning_tags
        self._reasoning_ids = (vocab[tags[0]], vocab[tags[1]]) if tags and all(t in vocab for t in tags) else None
        self._newline_ids = tokenizer.encode("\n", add_special_tokens=False)
        self._batch_backend = _plain_backend(tokenizer)
        self._linear: bool | None = None  # whether the template allows _split_linear (found on first use)
        self._max_chars: int | None = None  # _chars_per_token, found on first use

    def __repr__(self) -> str:
        return f"ChatFormat({self.name!r}, end_of_turn_id={self.end_of_turn_id})"

    def __getstate__(self) -> dict:
        # the tokenizers backend handle is rebuilt on the other side, from the tokenizer
        return {k: v for k, v in self.__dict__.items() if k != "_batch_backend"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._batch_backend = _plain_backend(self.tokenizer)

    # ------------------------------------------------------------------------------ ids

    @property
    def default_stop_tokens(self) -> tuple[str, ...]:
        """The format's own stop tokens: end of turn and end of text (``decoding.stop_tokens: null``)."""
        tokens = [self.spec.end_of_turn or self.tokenizer.eos_token, self.spec.end_of_text]
        return tuple(t for t in dict.fromkeys(tokens) if t is not None and t in self.tokenizer.get_vocab())

    def stop_ids(self, stop_tokens: Iterable[str] | None = None, generation_config: Any = None) -> list[int]:
        """Stop ids, in order and without duplicates: ``generation_config.eos_token_id`` (an int or a
        list; a dict or ``GenerationConfig``), the end-of-turn id, the tokenizer's eos id, then each
        of ``stop_tokens`` (default: ``default_stop_tokens``), each of which must be exactly one token.

        Raises:
            StopTokenError: a stop string is not exactly one token, or is not a string.
            ValueError: an eos id in ``generation_config`` is not a non-negative int.
        """
        if isinstance(stop_tokens, str):
            raise StopTokenError(f"stop tokens must be a list of strings, got the string {stop_tokens!r}; "
                                 f"write [{stop_tokens!r}]")
        ids: list[int] = []

        def add(token_id: Any, where: str) -> None:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InputError(f"{where} must be a non-negative int token id, got {token_id!r}")
            if token_id not in ids:
                ids.append(token_id)

        if generation_config is not None:
            eos = (generation_config.get("eos_token_id") if isinstance(generation_config, Mapping)
                   else getattr(generation_config, "eos_token_id", None))
            for token_id in [eos] if isinstance(eos, int) else (eos or []):
                add(token_id, "generation_config.eos_token_id")
        add(self.end_of_turn_id, "the end-of-turn id")
        if self.tokenizer.eos_token_id is not None:
            add(self.tokenizer.eos_token_id, "tokenizer.eos_token_id")
        for text in self.default_stop_tokens if stop_tokens is None else stop_tokens:
            add(self.token_id(text), f"stop token {text!r}")
        return ids

    def token_id(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token (special tokens included, e.g. the end of
        turn, or ``"\\n\\n"`` where the vocabulary has it).

        Raises:
            StopTokenError: ``text`` is not a string, or encodes to zero or several tokens.
        """
        encoded = self.tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else None
        if encoded is None or len(encoded) != 1:
            got = "not a string" if encoded is None else f"{len(encoded)} tokens {encoded}"
            end = self.spec.end_of_turn or self.tokenizer.eos_token
            raise StopTokenError(
                f"stop token {text!r} is {got} with this tokenizer; a stop token must be exactly one token, such as "
                f"{end!r}. Multi-token stops such as '\\nuser\\n' are stop strings: pass them to the decoder "
                "(packlora decode --stop-string)"
            )
        return encoded[0]

    def pad_id(self, stop_ids: Sequence[int] = ()) -> int:
        """The id written into padding: the tokenizer's pad token, else its eos, else the first stop id.

        Raises:
            ValueError: none of them exists.
        """
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, *stop_ids):
            if candidate is not None:
                return candidate
        raise InputError("no pad id: the tokenizer has neither a pad nor an eos token, and no stop id was given")

    def format_ids(self, ids: Iterable[int]) -> str:
        """``"id 'text', ..."`` for logs, each id decoded with special tokens kept."""
        return ", ".join(f"{i} {self.tokenizer.decode([i], skip_special_tokens=False)!r}" for i in ids)

    def header_positions(self, input_ids: Sequence[int]) -> list[int]:
        """Positions of the role-header tokens in ``input_ids``: each header-start token through the
        header's end (the header-end token and the newline tokens after it, or, without a
        header-end token, the first token whose text contains a newline). Empty for ``generic``."""
        if self._header_start_id is None:
            return []
        out, n = [], len(input_ids)
        for p, t in enumerate(input_ids):
            if t != self._header_start_id:
                continue
            q = p
            while q < n and q - p <= 16:  # a role name is a few tokens; bound the scan
                out.append(q)
                if q > p and self._header_end_id is None and "\n" in self.tokenizer.decode([input_ids[q]]):
                    break
                if q > p and input_ids[q] == self._header_end_id:
                    while q + 1 < n and "\n" in (t := self.tokenizer.decode([input_ids[q + 1]])) and not t.strip():
                        q += 1  # the newlines that close the header (Llama-3: "\n\n")
                        out.append(q)
                    break
                q += 1
        return out

    def trainable_control_ids(self) -> frozenset[int]:
        """Control ids a label may hold: the end of turn, the reasoning tags of a Qwen3 reply, and
        the tokenizer's eos, which ends a stage-1 text document."""
        eos = self.tokenizer.eos_token_id
        return frozenset({self.end_of_turn_id, *(self._reasoning_ids or ()), *(() if eos is None else (eos,))})

    # ------------------------------------------------------------------------------ text

    def spells_control_token(self, text: str) -> bool:
        """True when ``text`` contains the text of a control token (tokenised as text all the same)."""
        return self._control_re.search(text) is not None

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The template's rendering of ``messages`` (reasoning normalised for qwen3), as a string."""
        return self._render(self._prepare(messages, "render"), add_generation_prompt)

    def encode_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """Ids of the generation prompt for ``messages`` (ending with the assistant header), with the
        messages' text kept as text: what a model sees before it writes its reply."""
        return self._encode_piece(self._render(self._mark(self._prepare(messages, "prompt")), True), first=True)

    @staticmethod
    def split_reference(messages: Sequence[Mapping]) -> tuple[list[dict], str | None]:
        """``(prompt, reference)``: a chat that ends with an assistant message is split into the
        messages before it and that message's content; any other chat is all prompt.

        >>> ChatFormat.split_reference([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        ([{'role': 'user', 'content': 'a'}], 'b')
        """
        messages = [dict(m) for m in messages]
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None

    # ------------------------------------------------------------------------------ labels

    def encode_full(self, messages: Sequence[Mapping]) -> list[int]:
        """Ids of the whole rendered chat in one piece (message text kept as text). Only for
        ``data.labels: legacy_full_sequence``, the bug reproduction that labels all of it."""
        return self._encode_piece(self._render(self._mark(self._prepare(messages, "chat")), False), first=True)

    def encode_chat(self, messages: Sequence[Mapping], example: str = "example",
                    max_length: int | None = None) -> EncodedChat:
        """The labelled example(s) of one chat: assistant replies and their end-of-turn trained,
        everything else -100 (see the module docstring for how pieces are found).

        The renderings of every prefix of the chat are found in time linear in its length when the
        template is prefix-local (``_split_linear``), else by rendering each prefix (quadratic).

        Args:
            messages: ``[{"role", "content", "reasoning_content"?}, ...]``, validated (``records.py``).
            example: a name for error messages, e.g. ``"data.jsonl:12"``.
            max_length: when given, an example whose rendering certainly has more tokens
                (``min_tokens``) is not tokenised: its entry in ``examples`` is None (over the limit).

        Raises:
            LabelError: the template cannot be split at a reply (``template_mismatch``), a reply is
                not closed by the end-of-turn token (``no_end_of_turn``), a reply has reasoning
                while thinking is off (``reasoning_with_thinking_off``), or the template refused the
                chat (``template_error``, its ``raise_exception``).
        """
        [out] = self.encode_chats([messages], [example], max_length)
        if isinstance(out, LabelError):
            raise out
        return out

    def encode_chats(self, chats: Sequence[Sequence[Mapping]], examples: Sequence[str],
                     max_length: int | None = None) -> list[EncodedChat | LabelError]:
        """``encode_chat`` of every chat (``examples``: their names), a chat that cannot be labelled
        giving its ``LabelError`` in its place instead of raising. The text of all the chats goes to
        the tokenizer in one batch (``_encode_pieces``) and the audit decodes all their examples in one
        call: the same ids, labels and counts as one ``encode_chat`` per chat (a text's ids do not
        depend on its batch), without a tokenizer call per chat (``tokenize_batch`` passes a
        ``datasets`` batch)."""
        plans: list[_ChatPlan | LabelError] = []
        for messages, example in zip(chats, examples):
            try:
                plans.append(self._plan_chat(messages, example, max_length))
            except LabelError as e:
                plans.append(e)
        flat = [(text, k == 0) for p in plans if isinstance(p, _ChatPlan)
                for pieces in p.pieces if pieces is not None for k, (text, _) in enumerate(pieces)]
        encoded = self._encode_pieces(flat)
        out: list[EncodedChat | LabelError] = []
        audit: list[tuple[int, list[int], str]] = []  # (chat, ids, the rendering they must decode to)
        at = 0
        for p in plans:
            if isinstance(p, LabelError):
                out.append(p)
                continue
            start, at = at, at + sum(len(pieces) for pieces in p.pieces if pieces is not None)
            try:
                segs, checks = self._finish_chat(p, encoded[start:at])
            except LabelError as e:
                out.append(e)
                continue
            audit += [(len(out), ids, expected) for ids, expected in checks]
            out.append(EncodedChat(tuple(segs), p.turns_per_example, len(segs) > 1, 0, p.control_text))
        decoded = self._decode_many([ids for _, ids, _ in audit])
        mismatches = Counter(chat for (chat, _, expected), text in zip(audit, decoded) if text != expected)
        for chat, n in mismatches.items():
            out[chat] = replace(out[chat], render_mismatch=n)
        return out

    def _plan_chat(self, messages: Sequence[Mapping], example: str, max_length: int | None) -> _ChatPlan:
        """Everything of ``encode_chat`` before the tokenizer: the pieces of each example (None for one
        certainly over ``max_length``), rendered and split (see ``encode_chat`` for the errors)."""
        plain = self._prepare(messages, example)
        marked = self._mark(plain)
        turns = [i for i, m in enumerate(plain) if m["role"] == "assistant"]
        try:
            split = self._split_linear(marked[: turns[-1] + 1], turns, example) if turns else None
            if split is None:
                split = self._split_by_prefixes(marked, turns, example)
        except _template_errors() as e:
            raise LabelError(f"{example}: the chat template refused this chat ({e}); fix the chat or the template (or "
                             "set data.on_error: skip to leave such chats out, counted)", "template_error") from None
        pieces_by_example, ends, renders = split
        turns_per_example = tuple(sum(is_reply for _, is_reply in pieces) for pieces in pieces_by_example)
        # no control-token text (``_mark`` returned every string itself): the renderings above serve the audit
        unmarked = all(v is m[k] for mm, m in zip(marked, plain) for k, v in mm.items())
        # certainly too long: not tokenised (a 20 MB message costs no tokenizer time)
        pieces = tuple(None if max_length is not None and self.min_tokens(rendered) > max_length else p
                       for p, rendered in zip(pieces_by_example, renders))
        control_text = sum(
            self.spells_control_token(m["content"]) or self.spells_control_token(m.get("reasoning_content") or "")
            for m in plain
        )
        return _ChatPlan(example, pieces, tuple(ends), tuple(renders), plain, unmarked, turns_per_example,
                         control_text)

    def _finish_chat(self, plan: _ChatPlan, encoded: list[list[int]]
                     ) -> tuple[list[Segment | None], list[tuple[list[int], str]]]:
        """The segments of a planned chat from its pieces' ids (in order), and for the audit each
        tokenised one's ``(ids, the rendering they must decode to)``.

        Raises:
            LabelError: a reply not closed by the end-of-turn token (``no_end_of_turn``).
        """
        segs: list[Segment | None] = []
        checks: list[tuple[list[int], str]] = []
        at = 0
        for pieces, last, rendered in zip(plan.pieces, plan.ends, plan.renders):
            if pieces is None:
                segs.append(None)
                continue
            seg = self._label_encoded(encoded[at: at + len(pieces)], pieces, plan.example)
            at += len(pieces)
            expected = rendered if plan.unmarked else self._render(plan.plain[: last + 1], False)
            checks.append((list(seg.input_ids), expected))
            segs.append(seg)
        return segs, checks

    def _decode_many(self, ids: list[list[int]]) -> list[str]:
        """``_decode`` of each, in one ``decode_batch`` call where ``_decode`` uses the backend."""
        if not ids:
            return []
        if self._batch_backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return [self._decode(i) for i in ids]
        return self._batch_backend.decode_batch(ids, skip_special_tokens=False)

    def _split_by_prefixes(self, marked: list[dict], turns: list[int], example: str):
        """``(pieces of each example, index of its last message, its rendering)``: for every assistant
        message ``i`` the template renders ``marked[:i]`` with the generation prompt and
        ``marked[:i + 1]`` (module docstring). Two renderings per turn, each as long as the chat so
        far: quadratic in the number of turns. ``_split_linear`` gives the same result in linear time
        when the template allows it."""
        pieces_by_example: list[list[tuple[str, bool]]] = []
        ends: list[int] = []  # index of the last message of each example
        renders: list[str] = []  # the rendering of each example's messages (markers included)
        covered = ""
        for i in turns:
            prompt, full = self._render(marked[:i], True), self._render(marked[: i + 1], False)
            if not full.startswith(prompt):
                raise _template_mismatch(example, i)
            if pieces_by_example and prompt.startswith(covered):
                pieces_by_example[-1].append((prompt[len(covered):], False))
            else:
                pieces_by_example.append([(prompt, False)])
                ends.append(-1)
                renders.append("")
            pieces_by_example[-1].append((full[len(prompt):], True))
            ends[-1] = i
            renders[-1] = covered = full
        return pieces_by_example, ends, renders

    def _split_linear(self, marked: list[dict], turns: list[int], example: str):
        """``_split_by_prefixes``'s result from two renderings of the whole chat, or None when this
        template and chat do not allow it (the caller then renders every prefix).

        The template renders ``marked`` once without and once with the generation prompt, reading the
        messages through ``_Tape``, which records how much text had been written when the template
        fetched message ``k``. When the template reads the messages only in one forward loop (plus
        ``messages[0]``, earlier messages and truthiness; no ``loop.last``, ``length``, slices but
        ``[k:]``, look-ahead, or namespace writes carrying state out of the loop: ``_Tape`` and
        ``_linear_template`` check), its rendering of ``marked[:k]`` is exactly the text written before
        message ``k`` was fetched, then what it writes after the loop (the same for every ``k``).
        The renderings are used only if the loop part does not depend on the generation prompt, nothing
        follows the loop without it, and the whole rendering equals ``tokenizer.apply_chat_template``'s;
        so every piece is the one ``_split_by_prefixes`` finds.
        """
        rendered = self._linear_render(marked)
        if rendered is None:
            return None
        full, offsets, gen = rendered
        at = offsets + [len(full)]  # at[k]: length of the rendering of marked[:k]

        def prompt_end(i: int) -> int:  # the rendering of marked[:i] + generation prompt is full[:prompt_end(i)]
            return 0 if i == 0 else at[i] + len(gen)

        pieces: list[tuple[str, bool]] = []
        covered = 0
        for i in turns:
            if i and (full[at[i]: at[i] + len(gen)] != gen or at[i] + len(gen) > at[i + 1]):
                raise _template_mismatch(example, i)
            pieces.append(((full[covered: at[i]] + gen) if i else "", False))
            pieces.append((full[prompt_end(i): at[i + 1]], True))
            covered = at[i + 1]
        return [pieces], [turns[-1]], [full]

    def _linear_template(self):
        """The compiled chat template when ``_split_linear`` may use it, else None: no construct
        whose output Jinja buffers (macros, call and filter blocks, block ``set``, includes,
        recursive loops) and no namespace attribute set (``{% set ns.x %}``, state that outlives a loop)."""
        if self._linear is None:
            self._linear = False
            try:
                from jinja2 import nodes
                from transformers.utils.chat_template_utils import _compile_jinja_template

                compiled = _compile_jinja_template(_template(self.tokenizer))
                tree = compiled.environment.parse(_template(self.tokenizer))
            except Exception:  # noqa: BLE001  (a transformers or jinja2 without these internals: prefixes)
                return None
            buffered = (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.AssignBlock, nodes.Include,
                        nodes.Import, nodes.FromImport, nodes.Extends, nodes.Block, nodes.NSRef)
            recursive = any(loop.recursive for loop in tree.find_all(nodes.For))
            self._linear = not recursive and next(tree.find_all(buffered), None) is None
        if not self._linear:
            return None
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(_template(self.tokenizer))

    def _linear_render(self, marked: list[dict], full: str | None = None) -> tuple[str, list[int], str] | None:
        """``(rendering of marked, offsets, generation prompt)`` for ``_split_linear``: ``offsets[k]``
        is the length of the rendering of ``marked[:k]``, and that rendering plus the generation
        prompt is the one with ``add_generation_prompt``; None when the template does not allow it.

        ``apply_chat_template`` renders the chat first (or ``full`` is that rendering, or its
        ``_digest``); the two ``_Tape`` renderings are compared with it piece by piece as the template
        writes them, never joined, so a 50 MB message costs one rendering's memory, not three.
        """
        template = self._linear_template()
        if template is None:
            return None
        full = self._render(marked, False) if full is None else full
        n = len(full) if isinstance(full, str) else full[0]
        tape, tail = self._render_tape(template, marked, False, full)  # all of it, nothing after the loop
        if tape is None or tail or tape.written != n or tape.end != n or min(tape.offsets[1:], default=0) < 0:
            return None
        tape_g, gen = self._render_tape(template, marked, True, full)  # the same, then the generation prompt
        if tape_g is None or tape_g.offsets != tape.offsets or tape_g.end != n:
            return None
        return full, tape.offsets, gen

    def _render_tape(self, template, messages: list[dict], add_generation_prompt: bool, expected):
        """``(tape, tail)``: ``messages`` rendered with ``template`` as ``apply_chat_template`` renders
        them, read through a ``_Tape``, the text compared with ``expected`` as it is written (a
        string, or the ``(length, sha256)`` ``_digest`` of one); ``tail`` is what is written after
        it. ``(None, "")`` when the text departs from ``expected`` or the tape saw the template read
        the messages in a way that rules the linear split out."""
        try:
            from transformers.utils.chat_template_utils import _alias_reasoning_fields
        except ImportError:
            _alias_reasoning_fields = list  # noqa: N806
        kwargs = {**self.tokenizer.special_tokens_map}
        if self.enable_thinking is not None:
            kwargs["enable_thinking"] = self.enable_thinking
        tape = _Tape(_alias_reasoning_fields([dict(m) for m in messages]))
        text = expected if isinstance(expected, str) else None
        n = len(text) if text is not None else expected[0]
        hasher = None if text is not None else hashlib.sha256()
        tail: list[str] = []
        for chunk in template.generate(messages=tape, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **kwargs):
            at = tape.written
            if at < n:
                head = chunk[: n - at]
                if hasher is not None:
                    hasher.update(head.encode("utf-8", "surrogatepass"))
                elif not text.startswith(head, at):
                    return None, ""
                if len(chunk) > len(head):
                    tail.append(chunk[len(head):])
            else:
                tail.append(chunk)
            tape.written += len(chunk)
        if tape.written < n or (hasher is not None and hasher.hexdigest() != expected[1]):
            return None, ""  # shorter than expected, or different
        return (tape if tape.ok else None), "".join(tail)

    def certainly_longer(self, messages: Sequence[Mapping], max_length: int) -> bool:
        """True when the one example of this chat is certainly longer than ``max_length`` tokens
        (``min_tokens`` of its rendering), found without tokenising and without splitting it into
        pieces; False when it may fit, or when only ``encode_chat`` can tell (a template that needs
        every prefix rendered, or a chat it refuses). Holds one rendering of the chat at a time."""
        try:
            plain = self._prepare(messages, "check")
            marked = self._mark(plain)
            turns = [i for i, m in enumerate(plain) if m["role"] == "assistant"]
            if not turns:
                return False
            marked = marked[: turns[-1] + 1]
            full = self._render(marked, False)
            if self.min_tokens(full) <= max_length:
                return False
            digest = _digest(full)
            del full  # the tape renderings are checked against its digest
            return self._linear_render(marked, digest) is not None  # one example: the rendering checked above
        except (LabelError, *_template_errors()):
            return False

    def min_tokens(self, rendered: str) -> int:
        """A lower bound on the tokens of ``rendered`` (a rendering, control-token text in messages
        marked) as ``_encode_pieces`` tokenises it, however it is cut into pieces: one token per
        template control token, plus, for a byte-level BPE tokenizer without an unknown token, the
        other characters divided by ``_chars_per_token`` (no token stands for more). Linear in the
        length and allocation-free: it decides that a 50 MB message is over ``max_seq_length``
        without tokenising it; it is far below the true count, so only gross overflows are cut short.
        """
        marked = rendered.count(_MARK_START)
        control = control_chars = 0
        for m in self._control_re.finditer(rendered):
            if m.start() == 0 or rendered[m.start() - 1] != _MARK_START:  # one the template wrote: one token
                control += 1
            control_chars += m.end() - m.start()
        per_token = self._chars_per_token()
        if not per_token:
            return control
        text_chars = len(rendered) - control_chars - 2 * marked  # markers are dropped, marked text kept
        return control + max(0, -(-text_chars // per_token))

    def _chars_per_token(self) -> int:
        """The most characters of message text one token can stand for, or 0 when there is no such
        bound: for a byte-level BPE vocabulary without an unknown token, the longest token's bytes
        (one character per byte in its vocabulary) times how much the normaliser can shrink UTF-8
        text (NFC at most 3 bytes to 1, as Hangul jamo; NFKC/NFKD and lower-casing at most 4 to 1); a
        character is at least one byte. Other normalisers (strip, replace, precompiled) may delete
        text: no bound."""
        if self._max_chars is None:
            self._max_chars = 0
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            try:
                import json

                import tokenizers

                pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else {}
                norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else None
                steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
                norms = [] if norm is None else norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
                shrink = {"NFC": 3, "NFD": 1, "NFKC": 4, "NFKD": 4, "Lowercase": 4}
                model = backend.model
                if (any(step.get("type") == "ByteLevel" for step in steps) and isinstance(model, tokenizers.models.BPE)
                        and model.unk_token is None and all(n.get("type") in shrink for n in norms)):
                    factor = 1
                    for n in norms:
                        factor *= shrink[n["type"]]
                    self._max_chars = factor * max(len(t) for t in backend.get_vocab(with_added_tokens=False))
            except Exception:  # noqa: BLE001  (not a tokenizers BPE backend: no bound from text)
                self._max_chars = 0
        return self._max_chars

    def encode_text(self, text: str) -> list[int]:
        """Ids of raw text (a stage-1 document) with every control-token string in it kept as text,
        as in a chat message: a document that spells ``<|im_start|>`` trains the characters, never the
        control token."""
        return self._encode_texts([(text, True)])[0]

    def _label_encoded(self, encoded: list[list[int]], pieces: list[tuple[str, bool]], example: str) -> Segment:
        """The segment of one example from its pieces' ids: replies (through their end of turn) trained,
        the rest -100."""
        ids: list[int] = []
        labels: list[int] = []
        for piece, (text, is_reply) in zip(encoded, pieces):
            ids += piece
            if not is_reply:
                labels += [IGNORE_INDEX] * len(piece)
                continue
            if self.end_of_turn_id not in piece:
                raise LabelError(f"{example}: an assistant reply is not closed by the end-of-turn token "
                                 f"{self.format_ids([self.end_of_turn_id])} in the template's rendering; packlora "
                                 "trains that token so the model learns to stop", "no_end_of_turn")
            last = len(piece) - 1 - piece[::-1].index(self.end_of_turn_id)
            trained = piece[: last + 1] + [IGNORE_INDEX] * (len(piece) - last - 1)
            if not self.train_reasoning:
                trained = self._mask_reasoning(piece, trained)
            labels += trained
        return Segment(tuple(ids), tuple(labels))

    def _mask_reasoning(self, piece: list[int], labels: list[int]) -> list[int]:
        """-100 on a reply's reasoning block: its open tag through its close tag and the whitespace after."""
        if self._reasoning_ids is None or self._reasoning_ids[0] not in piece or self._reasoning_ids[1] not in piece:
            return labels
        start, end = piece.index(self._reasoning_ids[0]), piece.index(self._reasoning_ids[1])
        while end + 1 < len(piece) and not self.tokenizer.decode([piece[end + 1]]).strip():
            end += 1
        return [IGNORE_INDEX if start <= p <= end else lab for p, lab in enumerate(labels)]

    def _mark(self, obj):
        """Wrap every control token spelled in message text (strings in dicts and lists, recursively)
        in private-use markers, so that ``_encode_piece`` can tell it from one the template wrote.
        Markers already in the text are dropped first, so they cannot forge a marked token."""
        if isinstance(obj, str):
            if _MARK_START in obj or _MARK_END in obj:
                obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
            if self._control_re.search(obj) is None:
                return obj  # the same object: nothing to mark (no copy of a long message)
            return self._control_re.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, obj)
        if isinstance(obj, dict):
            return {k: self._mark(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._mark(v) for v in obj]
        return obj

    def _encode_piece(self, text: str, first: bool) -> list[int]:
        """Ids of one rendered piece (``_encode_pieces`` of one)."""
        return self._encode_pieces([(text, first)])[0]

    def _encode_pieces(self, pieces: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """Ids of rendered pieces ``(text, first)``: the template's control tokens as tokens,
        everything between them (marked control tokens included, markers dropped) as text, with no
        added token matched. The text spans of all pieces are encoded in one batch.

        A text span from the middle of a chat is encoded after a newline that is then removed (as
        transformers does for ``sanitize_control_tokens``), so that a SentencePiece tokenizer adds
        no prefix space at its start; byte-level tokenizers encode it the same either way.
        """
        layout: list[list[int]] = []  # per piece: control ids as ``-1 - id``, text spans as their index in ``spans``
        spans: list[tuple[str, bool]] = []
        for text, first in pieces:
            items = []
            for k, part in enumerate(self._template_control_re.split(text)):
                if k % 2:
                    items.append(-1 - self._control_id[part])
                elif part:
                    items.append(len(spans))
                    spans.append((part.replace(_MARK_START, "").replace(_MARK_END, ""), first and k == 0))
            layout.append(items)
        encoded = self._encode_texts(spans)
        return [[t for i in items for t in ([-1 - i] if i < 0 else encoded[i])] for items in layout]

    def _encode_texts(self, spans: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """``_encode_text`` of every ``(text, at_start)``; the spans without added-token text go to
        the tokenizer in one ``encode_batch_fast`` call where that gives ``encode``'s ids."""
        backend = self._batch_backend
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return [self._encode_text(text, at_start) for text, at_start in spans]
        out: list[list[int] | None] = [None] * len(spans)
        batch = []
        for i, (text, at_start) in enumerate(spans):
            if self._added_re.search(text) is None:
                batch.append(i)
            else:
                out[i] = self._encode_text(text, at_start)
        inputs = [spans[i][0] if spans[i][1] else "\n" + spans[i][0] for i in batch]
        n, again = len(self._newline_ids), []
        for i, enc in zip(batch, backend.encode_batch_fast(inputs, add_special_tokens=False) if inputs else ()):
            ids = enc.ids
            if spans[i][1] or ids[:n] == self._newline_ids:
                out[i] = ids if spans[i][1] else ids[n:]
            else:  # the newline merged with the text (it starts with whitespace): the text alone
                again.append(i)
        for i, enc in zip(again, backend.encode_batch_fast([spans[i][0] for i in again], add_special_tokens=False)
                          if again else ()):
            out[i] = enc.ids
        return out  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=False)``, straight from the tokenizers backend
        where that is what transformers would return (no clean-up of spaces)."""
        if self._batch_backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        return self._batch_backend.decode(ids, skip_special_tokens=False)

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        encode = self._encode_plain if self._added_re.search(text) is None else self._encode_without_added
        if at_start:
            return encode(text)
        ids = encode("\n" + text)
        n = len(self._newline_ids)
        return ids[n:] if ids[:n] == self._newline_ids else encode(text)

    def _encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_without_added(self, text: str) -> list[int]:
        """Text with added-token strings in it, encoded as plain text (the tokenizers pipeline
        without its added-token matching; a slow tokenizer skips special tokens only)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [t.id for split in splits for t in backend.model.tokenize(split)]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def _prepare(self, messages: Sequence[Mapping], example: str) -> list[dict]:
        """Plain ``{"role", "content"}`` dicts; qwen3: reasoning moved into ``reasoning_content``."""
        out = []
        for m in messages:
            d = {"role": m["role"], "content": m["content"]}
            reasoning = m.get("reasoning_content")
            if self.spec.reasoning_tags and m["role"] == "assistant":
                if reasoning is None and self.spec.reasoning_tags[1] in d["content"]:
                    reasoning, d["content"] = split_inline_reasoning(d["content"], self.spec.reasoning_tags)
                if reasoning and self.enable_thinking is False:
                    raise LabelError(f"{example}: an assistant reply carries reasoning but data.enable_thinking is "
                                     "false; remove the reasoning or turn thinking on", "reasoning_with_thinking_off")
            if reasoning is not None:
                d["reasoning_content"] = reasoning
            out.append(d)
        return out


def _digest(text: str) -> tuple[int, str]:
    """``(length, sha256 of the UTF-8 text)``, hashed a megabyte at a time (no copy of a long text)."""
    h = hashlib.sha256()
    for i in range(0, len(text), 1 << 20):
        h.update(text[i: i + (1 << 20)].encode("utf-8", "surrogatepass"))
    return len(text), h.hexdigest()


def _template_mismatch(example: str, i: int) -> LabelError:
    return LabelError(
        f"{example}: the chat template does not render assistant messages[{i}] as a continuation of its "
        "generation prompt, so its reply cannot be split from the prompt; check the template (or set "
        "data.on_error: skip to leave such chats out, counted)", "template_mismatch")


def _template_errors() -> tuple[type[Exception], ...]:
    """What a chat template raises to refuse a chat (``raise_exception`` in the template)."""
    try:
        from jinja2 import TemplateError

        return (TemplateError,)
    except ImportError:
        return ()


class _Tape:
    """The ``messages`` a chat template reads in one rendering, recording what it reads.

    ``offsets[k]`` is how much text had been written (``written``, kept by the renderer) when the
    template fetched message ``k`` in its loop over the messages; ``end`` the same when the loop
    ended. ``ok`` stays True while the template's rendering of any prefix ``messages[:k]`` is
    provably the text written before message ``k`` was fetched plus what follows the loop: one
    forward loop, fetched by Jinja's loop itself (not by ``loop.last``/``nextitem`` peeking ahead),
    reads of ``messages[j]`` only for ``j == 0`` or a message already fetched while the loop runs,
    truthiness, and ``[k:]`` views; no ``len``, negative index, other slices or membership tests.
    """

    __slots__ = ("items", "start", "root", "offsets", "end", "written", "fetched", "iterations", "ok")

    def __init__(self, items: list, start: int = 0, root: "_Tape | None" = None):
        self.items, self.start, self.root = items, start, root or self
        if root is None:
            self.offsets: list[int] = [-1] * len(items)
            self.end = -1
            self.written = 0
            self.fetched = 0
            self.iterations = 0
            self.ok = True

    def _fail(self) -> None:
        self.root.ok = False

    def __iter__(self):
        root = self.root
        root.iterations += 1
        if root.iterations > 1:
            self._fail()
        return _TapeIterator(self)

    def __getitem__(self, key):
        root, view = self.root, self.items[self.start:] if self.start else self.items
        if isinstance(key, slice):
            if (key.stop is None and key.step in (None, 1) and (key.start is None or isinstance(key.start, int)
                                                                and not isinstance(key.start, bool) and key.start >= 0)):
                return _Tape(self.items, self.start + (key.start or 0), root)
            self._fail()
            return view[key]
        if isinstance(key, int) and not isinstance(key, bool):
            j = self.start + key
            if key < 0 or not (j == 0 or (root.end < 0 and j < root.fetched)):
                self._fail()
            return view[key]
        self._fail()
        return view[key]

    def __len__(self) -> int:
        self._fail()
        return len(self.items) - self.start

    def __bool__(self) -> bool:
        if self.start:  # a view [k:] may be empty for a prefix
            self._fail()
        return len(self.items) > self.start

    def __contains__(self, item) -> bool:
        self._fail()
        return item in self.items[self.start:]

    def __reversed__(self):
        self._fail()
        return reversed(self.items[self.start:])


_JINJA_RUNTIME = os.path.join("jinja2", "runtime.py")


class _TapeIterator:
    __slots__ = ("tape", "k")

    def __init__(self, tape: _Tape):
        self.tape, self.k = tape, tape.start

    def __iter__(self):
        return self

    def __next__(self):
        root = self.tape.root
        caller = sys._getframe(1).f_code
        if not (caller.co_filename == "<template>" or (caller.co_name == "__next__"
                                                       and caller.co_filename.endswith(_JINJA_RUNTIME))):
            root.ok = False  # loop.last / loop.nextitem peeking ahead, or a filter consuming the messages
        if self.k >= len(root.items):
            root.end = root.written
            raise StopIteration
        root.offsets[self.k] = root.written
        root.fetched = self.k + 1
        self.k += 1
        return root.items[self.k - 1]


def split_inline_reasoning(content: str, tags: tuple[str, str] = ("<think>", "</think>")) -> tuple[str, str]:
    """``(reasoning, reply)`` of a reply written as ``<think>…</think>…``, split the way Qwen3's
    template splits it (newlines next to the tags dropped).

    >>> split_inline_reasoning("<think>\\nrain\\n</think>\\n\\nIt rains.")
    ('rain', 'It rains.')
    """
    open_tag, close_tag = tags
    head, _, tail = content.partition(close_tag)
    return head.rstrip("\n").split(open_tag)[-1].lstrip("\n"), tail.lstrip("\n")


def _plain_backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` when calling it directly gives the ids of
    ``tokenizer.encode(text, add_special_tokens=False)`` for text without added-token strings and
    the text of ``tokenizer.decode`` (a transformers ``TokenizersBackend`` whose encoding and decoding
    path no subclass overrides), else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cls = type(tokenizer)
    if (backend is None or not hasattr(backend, "encode_batch_fast") or not isinstance(tokenizer, TokenizersBackend)
            or cls._encode_plus is not TokenizersBackend._encode_plus or cls.encode is not PreTrainedTokenizerBase.encode
            or cls._decode is not TokenizersBackend._decode or cls.decode is not PreTrainedTokenizerBase.decode):
        return None
    return backend


def _alternation(tokens) -> re.Pattern:
    """A regex matching any of ``tokens``, longest first (so a token wins over one it contains)."""
    return re.compile("|".join(map(re.escape, sorted(set(tokens), key=len, reverse=True))) or "(?!)")


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default")
    if not template:
        raise InputError("the tokenizer has no chat template; packlora renders chats with the model's own template "
                         "(set model.tokenizer to a tokenizer that has one)")
    return template


def _control_tokens(tokenizer: Any, template: str) -> tuple[str, ...]:
    """Special tokens, ``chat_control_tokens``, and added tokens the template writes (the rule of
    transformers' ``apply_chat_template(sanitize_control_tokens=True)``, with the template's raw text
    standing in for its literals)."""
    listed = set(getattr(tokenizer, "chat_control_tokens", None) or ())
    return tuple(
        tok.content for tok in tokenizer.added_tokens_decoder.values()
        if tok.special or tok.content in listed or (tok.content in template and not tok.content.isspace())
    )


@dataclass(frozen=True, slots=True)
class FormatRef:
    """A ``ChatFormat`` by reference, for the tokenising worker processes: the directory its tokenizer
    loads from, the pad token set after loading, the format's settings and the tokenizer's digest
    (``cache.tokenizer_digest``). A few hundred bytes to send where the format itself pickles to
    ~10 MB for a Qwen2 tokenizer (seconds per worker with dill). ``build()`` loads it once per
    process; ``format_ref`` makes one only when that load gives the very same tokenizer."""

    tokenizer_dir: str
    pad_token: str | None
    name: str
    enable_thinking: bool | None
    train_reasoning: bool
    digest: str

    def build(self) -> ChatFormat:
        """The format (loaded on first use in this process, then remembered).

        Raises:
            StateError: the tokenizer in ``tokenizer_dir`` changed since the reference was made.
        """
        return _build_format(self)


@functools.lru_cache(maxsize=4)  # a memo of loads: a forked worker inherits the parent's, a spawned one loads
def _build_format(ref: FormatRef) -> ChatFormat:
    from transformers import AutoTokenizer

    from packlora.core.errors import StateError
    from packlora.data_utils.cache import tokenizer_digest

    tok = AutoTokenizer.from_pretrained(ref.tokenizer_dir)
    if tok.pad_token is None and ref.pad_token is not None:
        tok.pad_token = ref.pad_token
    if tokenizer_digest(tok) != ref.digest:
        raise StateError(f"{ref.tokenizer_dir}: the tokenizer changed while the data was being tokenised; run again")
    return ChatFormat(tok, ref.name, enable_thinking=ref.enable_thinking, train_reasoning=ref.train_reasoning)


def format_ref(fmt: ChatFormat) -> FormatRef | None:
    """``fmt`` by reference, when its tokenizer loads from its ``name_or_path`` directory exactly as
    it is (checked by loading it once in this process); None when it does not (a tokenizer built or
    changed in memory, one that needs remote code): then send ``fmt`` itself."""
    from packlora.core.errors import PackloraError
    from packlora.data_utils.cache import tokenizer_digest

    tok = fmt.tokenizer
    path = getattr(tok, "name_or_path", "") or ""
    if not path or not os.path.isdir(path):
        return None
    ref = FormatRef(path, tok.pad_token, fmt.name, fmt.enable_thinking, fmt.train_reasoning, tokenizer_digest(tok))
    try:
        ref.build()
    except (PackloraError, OSError, ValueError):  # not loadable as it is: fall back to sending the format
        return None
    return ref
