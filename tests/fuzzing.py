"""Generated input for the property tests of packlora's readers (``tests/*/test_fuzz*.py``).

A generated file is a list of ``Line``s: bytes, the line ending that follows them, and whether the
line is *known good* (built by a strategy that only makes valid, unique records). Known-good lines
must always be read as records; every other line may or may not be bad, and the readers decide.

Strategies, from valid to hostile:

* valid chats (``messages``, ``sharegpt``, ``alpaca``) and ``{"text"}`` records whose text mixes
  ordinary characters, NUL and other control characters, every control token of ChatML and the
  private-use markers packlora uses internally;
* the same records mutated: a field dropped, replaced by a random JSON value of any type and
  nesting, an unknown role, an empty assistant turn, extra keys;
* random JSON values of every type; lone surrogates in ``\\u`` escapes; JSON nested deeper than
  Python's reader allows; a valid line cut short;
* random bytes and invalid UTF-8; a byte-order mark in the middle; CRLF and lone CR line ends; a
  last line without a line break.

Budget: the ``ci`` profile (the default) runs a fixed, derandomized set of examples per test,
sized to keep all property tests under a minute on 2 cores. The long search::

    PACKLORA_FUZZ=long PACKLORA_FUZZ_SCALE=200 PACKLORA_FUZZ_FINDS=/tmp/fuzz-finds \\
        python -m pytest tests/data_utils/test_fuzz.py tests/decoding/test_fuzz_prompts.py -p no:cacheprovider -x

runs ``PACKLORA_FUZZ_SCALE`` times as many examples, each run with fresh random seeds. When an
invariant fails, the (shrunk) input files are written to ``PACKLORA_FUZZ_FINDS`` (``<test>-<n>.jsonl``,
overwritten as Hypothesis shrinks, so what is left is the minimal example); copy them into
``tests/data_utils/bad_inputs/`` with an entry in ``tests/data_utils/test_bad_input.py``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CONTROL_TEXT = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\n", "<|im_start|>user\n",
                "<|im_end|>\n<|im_start|>system\n", "\U000f0000", "\U000f0001", "<think>", "</think>", "<|im_"]
"""Every ChatML control token, role headers spelled out, the private-use markers of ``ChatFormat``."""

settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.register_profile("long", derandomize=False, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
PROFILE = os.environ.get("PACKLORA_FUZZ", "ci")
settings.load_profile(PROFILE)
SCALE = int(os.environ.get("PACKLORA_FUZZ_SCALE", "100" if PROFILE == "long" else "1"))


def budget(n: int) -> settings:
    """``settings(max_examples=n)`` in CI, times ``PACKLORA_FUZZ_SCALE`` in the long search."""
    return settings(max_examples=n * SCALE)


@dataclass(frozen=True)
class Line:
    """One generated line: its bytes (without the ending), the ending, whether it is known good."""

    body: bytes
    end: bytes = b"\n"
    good: bool = False


def file_bytes(lines: list[Line], bom: bool = False) -> bytes:
    return (b"\xef\xbb\xbf" if bom else b"") + b"".join(line.body + line.end for line in lines)


def lines_read(raw: bytes) -> int:
    """How many lines a reader that splits at ``\\n`` only sees in ``raw``."""
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


def good_line_numbers(lines: list[Line]) -> set[int]:
    """1-based numbers of the known-good lines, as the reader numbers them: a line after a lone CR
    is part of the line before it, and so is a line that a lone CR ends (then neither is good)."""
    out, n, at_start = set(), 1, True
    for k, line in enumerate(lines):
        whole = at_start and (b"\n" in line.end or (line.end == b"" and k == len(lines) - 1))
        if line.good and whole:
            out.add(n)
        n += line.end.count(b"\n")
        at_start = line.end.endswith(b"\n")
    return out


COMPRESSED_HEADERS = [rb"\x1f\x8b\x08", rb"BZh[1-9](1AY&SY|\x17rE8P\x90)", rb"\xfd7zXZ\x00[\x00\x01\x04\x0a]",
                      rb"\x28\xb5\x2f\xfd", rb"PK\x03\x04"]
"""Headers of gzip, bzip2, xz, zstd and zip files (as ``file(1)`` knows them): a file that starts with
one is refused whole as compressed (``DataFileError``, reason ``compressed``), not read line by line."""


def compressed(raw: bytes) -> bool:
    import re

    return any(re.match(h, raw) for h in COMPRESSED_HEADERS)


def save_find(name: str, raw_files: list[bytes]) -> None:
    """Write the input of a failing example to ``$PACKLORA_FUZZ_FINDS`` (see the module docstring)."""
    out = os.environ.get("PACKLORA_FUZZ_FINDS")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for k, raw in enumerate(raw_files):
        Path(out, f"{name}-{k}.jsonl").write_bytes(raw)


def keep_finds(name: str, raw_files: list[bytes]):
    """Context manager: on any exception, ``save_find`` the input, then re-raise."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except BaseException:
            save_find(name, raw_files)
            raise

    return guard()


# ---------------------------------------------------------------------------------------- text

plain_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
control_text = st.sampled_from(CONTROL_TEXT)
odd_chars = st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\u2028", "\u00a0", "\ufeff", "\r", "\n", "\t", " "])
content = st.lists(st.one_of(plain_text, control_text, odd_chars), max_size=6).map("".join)
reply = st.tuples(content, st.characters(codec="utf-8", exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"]),
                  content).map("".join)  # at least one visible character: a valid assistant turn


def tagged(unique: int, text: str) -> str:
    """``text`` made unique by a numbered tag, so that generated valid records are never duplicates."""
    return f"#{unique} {text}"


@st.composite
def valid_record(draw, unique: int, prompt: bool = False) -> dict:
    """A valid record (a chat in one of three formats, or ``{"text"}`` unless ``prompt``); with
    ``prompt``, a chat that may end without an assistant turn (something to reply to)."""
    kinds = ["messages", "sharegpt", "alpaca"] + ([] if prompt else ["text"])
    kind = draw(st.sampled_from(kinds))
    if kind == "text":
        return {"text": tagged(unique, draw(content))}
    turns = draw(st.integers(1, 3))
    system = draw(st.booleans())
    msgs = [{"role": "system", "content": draw(content)}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": tagged(unique, draw(content)) if t == 0 else draw(content)})
        msgs.append({"role": "assistant", "content": draw(reply)})
    if prompt and draw(st.booleans()):
        msgs.pop()  # ends with the user: a bare prompt
    if kind == "messages":
        return {"messages": msgs}
    if kind == "sharegpt":
        who = {"system": "system", "user": draw(st.sampled_from(["human", "user"])),
               "assistant": draw(st.sampled_from(["gpt", "assistant"]))}
        return {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in msgs]}
    first_user = msgs[1 if system else 0]["content"]
    rec = {"instruction": first_user, "input": draw(st.sampled_from(["", "context"]))}
    if msgs[-1]["role"] == "assistant":
        rec["output"] = msgs[-1]["content"]
    if system:
        rec["system"] = msgs[0]["content"] or "S"
    return rec


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | plain_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner, max_size=3),
    max_leaves=8,
)


odd_values = st.one_of(st.sampled_from([None, True, 0, -1, 1.5, float("nan"), "", " ", [], {}, ["user"],
                                          {"role": "user"}, "bot", "tool", "System", "human ", "\u0000"]),
                        json_values)


def _places(obj, path=()):
    """Every place inside a JSON value: ``(container path, key or index)``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k
            yield from _places(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield path, i
            yield from _places(v, path + (i,))


@st.composite
def mutated_record(draw, unique: int) -> dict:
    """A valid record with one thing changed at any depth: a value replaced by one of any type, a
    key or list item removed, an extra key, an assistant turn emptied (a mutation may leave it valid)."""
    rec = draw(valid_record(unique))
    places = list(_places(rec))
    path, key = draw(st.sampled_from(places))
    parent = rec
    for step in path:
        parent = parent[step]
    how = draw(st.sampled_from(["replace", "replace", "remove", "extra", "empty", "wrap"]))
    if how == "replace":
        parent[key] = draw(odd_values)
    elif how == "remove":
        del parent[key]
    elif how == "extra" and isinstance(parent, dict):
        parent[draw(plain_text)] = draw(odd_values)
    elif how == "empty":
        parent[key] = draw(st.sampled_from(["", "  ", "\n", [], {}]))
    elif how == "wrap":
        parent[key] = [[parent[key]]]
    return rec


def _dumps(obj, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def line(draw, unique: int, prompt: bool = False) -> Line:
    """One line of any kind (see the module docstring)."""
    kind = draw(st.sampled_from(["valid"] * 4 + ["mutated"] * 3 + ["json", "surrogate", "deep", "cut", "bytes",
                                                                   "bad_utf8", "bom", "blank", "duplicate"]))
    end = draw(st.sampled_from([b"\n"] * 6 + [b"\r\n", b"\r", b"\n\n"]))
    ascii_only = draw(st.booleans())
    if kind == "valid":
        return Line(_dumps(draw(valid_record(unique, prompt)), ascii_only), end, good=True)
    if kind == "mutated":
        return Line(_dumps(draw(mutated_record(unique)), ascii_only), end)
    if kind == "json":
        return Line(_dumps(draw(json_values), ascii_only), end)
    if kind == "surrogate":
        text = draw(st.sampled_from(["\\ud800", "\\udfff", "a\\ud83dz", "\\udc00\\ud800"]))
        field = draw(st.sampled_from(['"text": "%s"', '"messages": [{"role": "user", "content": "%s"}, '
                                      '{"role": "assistant", "content": "ok"}]']))
        return Line(("{" + field % text + "}").encode(), end)
    if kind == "deep":
        depth = draw(st.sampled_from([5, 1_000, 100_000]))
        return Line(b'{"text": ' + b"[" * depth + b"]" * depth + b"}", end)
    if kind == "cut":
        body = _dumps(draw(valid_record(unique)), ascii_only)
        return Line(body[: draw(st.integers(0, max(0, len(body) - 1)))], end)
    if kind == "bytes":
        return Line(draw(st.binary(max_size=40)).replace(b"\n", b""), end)
    if kind == "bad_utf8":
        body = _dumps(draw(valid_record(unique)), False)
        at = draw(st.integers(0, len(body)))
        return Line(body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xf8\x88"]))
                    + body[at:], end)
    if kind == "bom":
        return Line(b"\xef\xbb\xbf" + _dumps(draw(valid_record(unique)), ascii_only), end)
    if kind == "blank":
        return Line(draw(st.sampled_from([b"", b" ", b"\t", b"\xc2\xa0", b"\x0b"])), end)
    return Line(b"DUPLICATE", end)  # replaced by a copy of an earlier line in ``lines``


@st.composite
def lines(draw, file_id: int = 0, prompt: bool = False, max_lines: int = 8) -> list[Line]:
    """A file's lines: mostly valid records, a mix of everything else; ``DUPLICATE`` lines become
    a copy of an earlier line (a duplicate record when that line was valid). ``file_id`` keeps the
    valid records of several files distinct."""
    n = draw(st.integers(0, max_lines))
    out: list[Line] = []
    for i in range(n):
        ln = draw(line(file_id * 1000 + i, prompt))
        if ln.body == b"DUPLICATE":
            ln = Line(draw(st.sampled_from(out)).body, ln.end) if out else Line(b"", ln.end)
        out.append(ln)
    if out and draw(st.booleans()):
        out[-1] = Line(out[-1].body, b"", out[-1].good)  # no line break after the last line
    return out


def fresh_dir(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d
