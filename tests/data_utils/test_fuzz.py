"""Property tests of the data path on generated input (``tests/fuzzing.py``: what is generated, the
CI budget, the long search): ``read_records``, ``prepare_data`` under ``on_error`` skip and error,
``packlora subset``, and the linear chat split against the per-prefix one.

Invariants:

* under ``skip`` nothing raises except ``NoExampleError`` when nothing is left;
* lines read = records kept + the counted skips, per source and in total, and every line the
  reader sees is counted (a reader that splits at ``\\n`` only);
* every skip and every error names ``file:line`` and a reason from the documented lists
  (``records.REASONS``, ``dataset.DROP_REASONS``); known-good lines are never skipped;
* under ``error`` the first bad line (in reading order) raises packlora's own error naming it,
  never a bare ``KeyError``/``TypeError``/``UnicodeError``, and a file with no bad line gives
  exactly what ``skip`` gives;
* labels hold no control token other than the end of turn (and the end of text of a ``{"text"}``
  document), no role header, and every label equals its input id.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget, compressed, file_bytes, good_line_numbers, keep_finds, lines, lines_read, valid_record
from packlora.core.errors import PackloraError
from packlora.data_utils.chat_format import LABEL_REASONS, ChatFormat, LabelError
from packlora.data_utils.config import DataConfig
from packlora.data_utils.dataset import DROP_REASONS, NoExampleError, prepare_data, record_key
from packlora.data_utils.records import REASONS, DataFileError, RecordError, iter_lines, read_records
from packlora.data_utils.subset import make_subset
from packlora.data_utils.types import IGNORE_INDEX

files = st.lists(st.tuples(lines(), st.booleans()), min_size=1, max_size=2).map(
    lambda fs: [(ls, bom) for ls, bom in fs])


def _write(d: Path, generated) -> tuple[list[Path], list[bytes], list[set[int]]]:
    paths, raws, goods = [], [], []
    for k, (ls, bom) in enumerate(generated):
        # distinct valid records across files: renumber the second file's tags (see fuzzing.lines)
        raw = file_bytes(ls, bom)
        if k:
            raw = raw.replace(b'"#', b'"#9')
        paths.append(d / f"f{k}.jsonl")
        paths[-1].write_bytes(raw)
        raws.append(raw)
        goods.append(good_line_numbers(ls))
    return paths, raws, goods


@budget(150)
@given(generated=st.tuples(lines(), st.booleans()))
def test_reader_counts_every_line_and_names_each_bad_one(generated):
    ls, bom = generated
    raw = file_bytes(ls, bom)
    with tempfile.TemporaryDirectory() as d, keep_finds("reader", [raw]):
        path = Path(d) / "f.jsonl"
        path.write_bytes(raw)
        skipped: list[RecordError] = []
        try:
            records = read_records(path, on_error="skip", skipped=skipped)
        except DataFileError as e:  # the only whole-file refusal of a regular file
            assert e.reason == "compressed" and compressed(raw), str(e)
            return
        assert len(records) + len(skipped) == lines_read(raw)
        numbers = sorted([r.source.line for r in records] + [e.source.line for e in skipped])
        assert numbers == list(range(1, lines_read(raw) + 1))
        for e in skipped:
            assert str(e).startswith(f"{path}:{e.source.line}: ") and e.reason in REASONS, str(e)
        assert not {e.source.line for e in skipped} & good_line_numbers(ls), "a valid line was skipped"
        try:
            strict = read_records(path)
        except RecordError as e:
            assert skipped, "raised on a file that skip reads whole"
            assert (e.source.line, e.reason, str(e)) == (skipped[0].source.line, skipped[0].reason, str(skipped[0]))
        else:
            assert not skipped and strict == records


ODD_VALUES = [None, True, 0, -1, 1.5, float("nan"), "", " ", "\x00", "\ud800", [], {}, ["user"], {"role": "user"},
              [[["deep"]]], "bot", "System", "human ", 10**30]
TEMPLATES = [
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                  {"role": "assistant", "content": "A", "reasoning_content": "R"}]},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}],
     "system": "S2"},
    {"instruction": "I", "input": "In", "output": "O", "system": "S"},
    {"text": "T"},
]


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
@pytest.mark.parametrize("prompt", [False, True])
def test_any_value_of_any_type_in_any_field_is_a_record_or_a_record_error(template, prompt):
    """Every place of a record of each format (messages, sharegpt, alpaca, text), replaced by a value
    of every JSON type, or removed: parse_record returns a record or raises RecordError with a reason
    from the list, nothing else (an unhashable role once raised TypeError)."""
    import copy

    from fuzzing import _places
    from packlora.data_utils.records import PROMPT_REASONS, parse_record
    from packlora.data_utils.types import Source

    base = TEMPLATES[template]
    places = list(_places(base))
    assert places
    for path, key in places:
        for value in [*ODD_VALUES, "REMOVE"]:
            rec = copy.deepcopy(base)
            parent = rec
            for step in path:
                parent = parent[step]
            if value == "REMOVE":
                del parent[key]
            else:
                parent[key] = value
            try:
                parse_record(rec, Source("f.jsonl", 9), prompt=prompt)
            except RecordError as e:
                assert str(e).startswith("f.jsonl:9: ") and e.reason in (*REASONS, *PROMPT_REASONS), (rec, str(e))


@budget(12)
@given(generated=files)
def test_prepare_data_accounts_for_every_line_under_skip_and_stops_at_the_first_bad_one_under_error(
        generated, qwen2_tokenizer):
    fmt = ChatFormat(qwen2_tokenizer)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths, raws, goods = _write(d, generated)
        if any(map(compressed, raws)):  # refused whole (test_reader_...), nothing to prepare
            return
        with keep_finds("prepare", raws):
            _check_prepare(d, fmt, paths, raws, goods)


def _check_prepare(d: Path, fmt: ChatFormat, paths, raws, goods) -> None:
    names = [str(p) for p in paths]
    cfg = lambda on_error, cache: DataConfig(train=names, on_error=on_error, max_seq_length=1024,  # noqa: E731
                                             cache_dir=str(d / cache))
    first, skips = _first_problem(paths)
    # skip: everything accounted for
    try:
        data = prepare_data(cfg("skip", "skip"), fmt)
    except NoExampleError as e:
        data = None
        assert e.report["lines_read"] == sum(map(lines_read, raws))
        assert set(e.report["dropped"]) <= set(DROP_REASONS), e.report
    if data is not None:
        r = data.report
        assert r.lines_read == sum(map(lines_read, raws))
        assert set(r.dropped) <= set(DROP_REASONS)
        for name, raw in zip(names, raws):
            src = r.sources[name]
            assert src["lines_read"] == lines_read(raw) == src["records"] + sum(src["skipped"].values())
            assert src["skipped"] == dict(sorted(Counter(e.reason for e in skips if e.source.path == name).items()))
        line_level = {k: v for k, v in r.dropped.items() if k in (*REASONS, "duplicate")}
        summed: dict[str, int] = {}
        for src in r.sources.values():
            for reason, n in src["skipped"].items():
                summed[reason] = summed.get(reason, 0) + n
        assert summed == line_level
        later = sum(v for k, v in r.dropped.items() if k not in line_level)
        assert r.records == r.examples - r.split_chunks + later
        _check_labels(data.rows, fmt)
        assert (r.control_tokens_in_labels, r.role_markers_in_labels) == (0, 0)
    for e in skips:  # no valid line skipped (a duplicate copy of one is not valid)
        assert e.reason == "duplicate" or e.source.line not in goods[names.index(e.source.path)], str(e)
    # error: the first problem in reading order, or exactly the skip result
    try:
        strict = prepare_data(cfg("error", "error"), fmt)
    except RecordError as e:
        assert first is not None, f"raised {e} on data that skip reads whole"
        assert (str(e.source), e.reason) == (str(first.source), first.reason)
        assert str(e).startswith(f"{e.source.path}:{e.source.line}: ")
    except NoExampleError:
        assert first is None and data is None
    except LabelError as e:  # a chat that cannot be labelled: skip counted it under the same reason
        assert first is None and data is not None and data.report.dropped.get(e.reason), str(e)
        assert e.reason in LABEL_REASONS and any(str(e).startswith(f"{n}:") for n in names), str(e)
    else:
        assert first is None and data is not None
        assert strict.report.to_dict() | {"cache_files": []} == data.report.to_dict() | {"cache_files": []}
        assert strict.rows[:] == data.rows[:]


def _first_problem(paths):
    """``(the first bad or duplicate line in reading order, every one of them)``, from
    ``read_records`` under skip and ``record_key`` (the definition of a duplicate)."""
    problems, seen = [], set()
    for path in paths:
        skipped: list[RecordError] = []
        records = read_records(path, on_error="skip", skipped=skipped)
        events = [(e.source.line, e) for e in skipped] + [(r.source.line, r) for r in records]
        for _, item in sorted(events, key=lambda x: x[0]):
            if isinstance(item, RecordError):
                problems.append(item)
                continue
            key = record_key(item)
            if key in seen:
                problems.append(RecordError(item.source, "duplicate", "duplicate"))
            seen.add(key)
    return (problems[0] if problems else None), problems


def _check_labels(rows, fmt: ChatFormat) -> None:
    allowed = {fmt.end_of_turn_id, fmt.tokenizer.eos_token_id}
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == sum(row["seq_lens"])
        headers = set(fmt.header_positions(ids))
        for p, (t, lab) in enumerate(zip(ids, labels)):
            if lab == IGNORE_INDEX:
                continue
            assert lab == t
            assert lab not in fmt.control_ids or lab in allowed, fmt.format_ids([lab])
            assert p not in headers


@budget(40)
@given(generated=st.tuples(lines(), st.booleans()), ratio=st.sampled_from([0.3, 0.5, 1.0]), seed=st.integers(0, 3))
def test_subset_keeps_lines_byte_for_byte_or_names_the_first_bad_one(generated, ratio, seed):
    ls, bom = generated
    raw = file_bytes(ls, bom)
    with tempfile.TemporaryDirectory() as d, keep_finds("subset", [raw]):
        src, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        src.write_bytes(raw)
        if compressed(raw):
            with pytest.raises(DataFileError, match="compressed"):
                make_subset(src, out, ratio, seed)
            return
        skipped: list[RecordError] = []
        records = read_records(src, on_error="skip", skipped=skipped)
        try:
            manifest = make_subset(src, out, ratio, seed, stratify="length")
        except RecordError as e:
            assert skipped and (e.source.line, e.reason) == (skipped[0].source.line, skipped[0].reason)
            return
        except PackloraError as e:
            assert not skipped and round(ratio * len(records)) < 1, str(e)  # empty input or subset
            return
        assert not skipped
        source_lines = [ln if ln.endswith(b"\n") else ln + b"\n" for _, ln, _ in iter_lines(src)]
        out_lines = out.read_bytes().splitlines(keepends=True) if b"\r" not in raw else None
        chosen = read_records(out)
        assert len(chosen) == manifest["counts"]["subset"] == round(ratio * len(records))
        by_text = [json.dumps([r.__class__.__name__, getattr(r, "text", None),
                               [m.as_dict() for m in getattr(r, "messages", ())]]) for r in records]
        picked = [json.dumps([r.__class__.__name__, getattr(r, "text", None),
                              [m.as_dict() for m in getattr(r, "messages", ())]]) for r in chosen]
        positions = [by_text.index(p) for p in picked]
        assert positions == sorted(positions)  # in source order
        if out_lines is not None:  # every output line is a source line, byte for byte, in source order
            it = iter(source_lines)
            assert all(any(ln == s for s in it) for ln in out_lines)


@budget(60)
@given(records=st.lists(valid_record(7, prompt=True), min_size=1, max_size=4),
       template=st.sampled_from(["chatml", "llama3", "generic"]))
def test_linear_chat_split_equals_rendering_every_prefix(records, template, chat_formats):
    fmt = chat_formats[template]
    from packlora.data_utils.records import parse_record
    from packlora.data_utils.types import Source

    for rec in records:
        chat = parse_record(rec, Source("x", 1), prompt=True).as_dicts()
        plain = fmt._prepare(chat, "x")
        marked = fmt._mark(plain)
        turns = [i for i, m in enumerate(plain) if m["role"] == "assistant"]
        if not turns:
            continue
        linear = fmt._split_linear(marked[: turns[-1] + 1], turns, "x")
        assert linear is not None, "this template is prefix-local: the linear split applies"
        assert linear == fmt._split_by_prefixes(marked, turns, "x")


@pytest.fixture(scope="module")
def chat_formats(chatml_tokenizer, tmp_path_factory):
    import copy

    from tiny_assets import build_llama3_tokenizer

    generic = copy.deepcopy(chatml_tokenizer)
    generic.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | trim }}{{ eos_token }}"
                             "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    return {"chatml": ChatFormat(chatml_tokenizer),
            "llama3": ChatFormat(build_llama3_tokenizer(tmp_path_factory.mktemp("llama3"))),
            "generic": ChatFormat(generic)}
