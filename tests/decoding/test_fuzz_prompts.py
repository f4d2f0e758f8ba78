"""Property tests of the prompt files that ``packlora decode --input`` and ``packlora eval-runaway
--input`` read (``decoding.decode.read_prompts``), on generated input (``tests/fuzzing.py``).

Invariants: a file whose every line is a valid chat gives one prompt per line, each the chat up to
its final assistant turn (the reference); any other file raises packlora's own error naming
``file:line`` and a reason from ``records.REASONS`` or ``records.PROMPT_REASONS``, at a line that is
not known good, never a builtin exception; the prompts before the failing line are exactly those a
``--limit`` stops at.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget, compressed, file_bytes, good_line_numbers, keep_finds, lines, lines_read
from packlora.core.errors import PackloraError
from packlora.data_utils.records import PROMPT_REASONS, REASONS, DataFileError, RecordError
from packlora.decoding.decode import read_prompts


@budget(150)
@given(generated=st.tuples(lines(prompt=True), st.booleans()))
def test_prompt_file_gives_a_prompt_per_line_or_names_the_first_bad_one(generated):
    ls, bom = generated
    raw = file_bytes(ls, bom)
    with tempfile.TemporaryDirectory() as d, keep_finds("prompts", [raw]):
        path = Path(d) / "prompts.jsonl"
        path.write_bytes(raw)
        good = good_line_numbers(ls)
        try:
            prompts = read_prompts(path)
        except RecordError as e:
            assert str(e).startswith(f"{path}:{e.source.line}: "), str(e)
            assert e.reason in (*REASONS, *PROMPT_REASONS), str(e)
            assert e.source.line not in good, f"a valid prompt line was refused: {e}"
            before = read_prompts(path, limit=e.source.line - 1) if e.source.line > 1 else []
            assert [p.source.line for p in before] == list(range(1, e.source.line))
            return
        except DataFileError as e:  # the only whole-file refusal of a regular file
            assert e.reason == "compressed" and compressed(raw), str(e)
            return
        except PackloraError as e:
            raise AssertionError(f"a line-level problem must be a RecordError, got {type(e).__name__}: {e}")
        assert len(prompts) == lines_read(raw)
        assert [p.source.line for p in prompts] == list(range(1, len(prompts) + 1))
        for p in prompts:
            assert p.messages and p.messages[-1]["role"] != "assistant"
            assert all(m["role"] in ("system", "user", "assistant") for m in p.messages)
        for k, ln in enumerate(ls):  # a known-good line that stands on its own gives back its own chat
            number = k + 1
            if number in good and all(x.end.count(b"\n") == 1 for x in ls[:k]):
                rec = json.loads(ln.body.decode("utf-8", "surrogatepass"))
                if "messages" in rec:
                    msgs = rec["messages"]
                    expected = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
                    reference = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else None
                    assert ([dict(m) for m in prompts[k].messages], prompts[k].reference) == (expected, reference)
