"""Multi-token stop strings: where a reply ends, cut before the match, and what a stream may show.

Generation itself stops through transformers (``generate(stop_strings=..., tokenizer=...)``,
whose ``StopStringCriteria`` matches the stop strings against the token stream in one tensor check
per step, whatever the tokenisation). This module does what that criterion does not: it finds
*where* in the text the stop string starts, so the reply can be cut exactly there, and it tells a
streamer which trailing characters may still become a stop string.

The matcher works on text: the row's new tokens are decoded (so a character whose UTF-8 bytes span
several tokens is whole once its last byte arrives) and each stop string is searched for with
``str.find``, which finds every occurrence wherever it starts, overlapping partial matches
included. ``tests/decoding/test_decoding_stop_strings.py`` checks that transformers' criterion stops
at the very token after which this matcher first sees a stop string.

Which stop wins: generation stops at the first token after which some stop string occurs in
the text; the reply is cut at the *start* of the earliest occurrence at that point::

    tokens:   "Hi"  "!"  "\\nus"  "er"  "\\n"  "more"
    text:     Hi!\\nuser\\n            stop string "\\nuser\\n" complete after the 5th token
    reply:    "Hi!"                   (cut before the match; "more" is never generated)

Example::

    >>> m = StopStringMatcher(["\\nuser\\n", "<start>"])
    >>> m.find("Hi!\\nuser\\nmore")
    (3, '\\nuser\\n')
    >>> m.find("aa") is None
    True
    >>> m.holdback("Hi!\\nus")      # "\\nus" may become "\\nuser\\n": hold 3 chars back when streaming
    3
    >>> StopStringMatcher(["aab"]).find("aaab")   # overlapping partial match
    (1, 'aab')
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from packlora.core.errors import InputError


@dataclass(frozen=True, slots=True)
class StringStop:
    """Where a stop string ended a token stream (``StopStringMatcher.first_stop``).

    Attributes:
        num_tokens: tokens generated up to and including the one that completed the match.
        text: the reply, i.e. the decoded text of those tokens cut before the match.
        kept_tokens: tokens whose text lies wholly before the match (``len(kept_tokens) <
            num_tokens``); the token in which the match starts is not kept, even when part of its
            text is in ``text``.
        stop_string: the stop string that matched.
    """

    num_tokens: int
    text: str
    kept_tokens: int
    stop_string: str


class StopStringMatcher:
    """Finds the earliest occurrence of any of a set of stop strings in a text.

    Args:
        stop_strings: non-empty strings; duplicates are dropped, order kept.

    Raises:
        ValueError: ``stop_strings`` is a bare string, or one of them is empty or not a string.
    """

    def __init__(self, stop_strings: Iterable[str]):
        if isinstance(stop_strings, str):
            raise InputError(f"stop_strings must be a list of strings, got the string {stop_strings!r}; "
                             f"write [{stop_strings!r}]")
        strings: list[str] = []
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise InputError(f"every stop string must be a non-empty string, got {s!r}")
            if s not in strings:
                strings.append(s)
        self.stop_strings: tuple[str, ...] = tuple(strings)

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def find(self, text: str) -> tuple[int, str] | None:
        """``(start, stop_string)`` of the earliest occurrence in ``text`` (the longest stop string
        on a tie), or None."""
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string: the
        characters a stream must not show yet, because the next tokens may complete a stop.

        >>> StopStringMatcher(["abc", "bd"]).holdback("xab"), StopStringMatcher(["abc"]).holdback("xa b")
        (2, 0)
        """
        longest = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def first_stop(self, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> StringStop | None:
        """Replay a token stream as generation saw it and return where a stop string ended it.

        Args:
            token_ids: generated ids (no prompt), already cut at the first stop id.
            decode: ids -> text, e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=False)``.

        Returns:
            The ``StringStop`` after the first token that completes a match, or None.
        """
        if not self.stop_strings:
            return None
        for n in range(1, len(token_ids) + 1):
            text = decode(token_ids[:n])
            hit = self.find(text)
            if hit is None:
                continue
            start, s = hit
            kept = 0
            while kept < n and len(decode(token_ids[: kept + 1])) <= start:
                kept += 1
            return StringStop(num_tokens=n, text=text[:start], kept_tokens=kept, stop_string=s)
        return None


class StopAwareStreamer(BaseStreamer):
    """A ``generate(streamer=...)`` streamer (batch size 1) that writes the reply as it is made,
    never showing a stop id, a stop string, or the characters that may yet become one.

    Text is written through ``write`` (default: ``sys.stdout`` with a flush). Trailing U+FFFD
    (a character whose UTF-8 bytes are not all generated yet) is held back as well.

    Args:
        tokenizer: decodes with ``skip_special_tokens=False``.
        stop_ids: token ids that end the reply.
        matcher: the stop strings (may be empty).
        write: a callable taking each new piece of text.
    """

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], matcher: StopStringMatcher | None = None,
                 write: Callable[[str], Any] | None = None):
        import sys

        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.matcher = matcher or StopStringMatcher([])
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.tokens: list[int] = []
        self.shown = 0
        self.done = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate passes the prompt first
            self._prompt_seen = True
            return
        if self.done:
            return
        ids = value.reshape(-1).tolist()
        if len(ids) != 1:
            raise InputError("StopAwareStreamer supports batch size 1 only; use --batch-size 1 with --stream")
        if ids[0] in self.stop_ids:
            self._flush(final=True)
            return
        self.tokens.append(ids[0])
        self._flush(final=False)

    def end(self) -> None:
        if not self.done:
            self._flush(final=True)
        self.write("\n")

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        hit = self.matcher.find(text)
        if hit is not None:
            safe, final = hit[0], True
        elif final:
            safe = len(text)
        else:
            safe = len(text) - self.matcher.holdback(text)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > self.shown:
            self.write(text[self.shown : safe])
            self.shown = safe
        self.done = final
