"""The bundled corpora give byte-identical ``input_ids``, labels and packed rows to the ones stored
in ``golden_digests.json``: a guard for any rework of reading, labelling or packing (issues 22, 25).

Each case runs ``prepare_data`` with the real Qwen2 tokenizer on one bundled corpus of
``../shared/data`` with the data settings of its stage config (``configs/*/stage*.yaml``, copied
here so that editing a config does not move the golden values) and the default ``num_proc``.
The digest of a column is sha256 over its values as little-endian int64 and its list offsets (so
int32 or int64 storage, chunking and the cache layout do not matter); the tokenised digest covers
every example, dropped ones included (``source``, ``drop_reason``), in order. Sources are stored
relative to ``shared/data`` (``shishuo/stage2_rewrite.jsonl:103``), so the digests do not depend on
where the checkout sits (CI clones to another directory than a developer's tree).

When a change of ids or labels is intended, bump ``dataset.PIPELINE_VERSION`` and replace the
values in ``golden_digests.json`` with the ones the failure prints, saying why in the commit.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from packlora.data_utils.config import DataConfig
from packlora.data_utils.dataset import prepare_data
from packlora.presets import load_preset
from tiny_assets import SHARED

GOLDEN = Path(__file__).parent / "golden_digests.json"
DATA = SHARED / "data"

# name -> (data settings of the stage config, preset)
CASES = {
    "shishuo_stage2": (dict(train=[str(DATA / "shishuo" / "stage2_rewrite.jsonl")], stage="sft", format="messages",
                            max_seq_length=512, overflow="drop", eval_holdout=16), "shishuo"),
    # no preset, rows short enough that the longest chats are dropped (counted as too_long)
    "shishuo_stage2_short_rows": (dict(train=[str(DATA / "shishuo" / "stage2_rewrite.jsonl")], max_seq_length=160),
                                  None),
    "zhanghenshui_stage2": (dict(train=[str(DATA / "zhanghenshui" / "stage2_continue.jsonl")], stage="sft",
                                 format="messages", max_seq_length=2048, overflow="drop", eval_holdout=16),
                            "zhang_henshui"),
    "shishuo_stage1": (dict(train=[str(DATA / "shishuo" / "stage1_text.jsonl")], stage="pretrain", format="text",
                            max_seq_length=1024, overflow="split", text_eos="document"), None),
    "zhanghenshui_stage1": (dict(train=[str(DATA / "zhanghenshui" / "stage1_text.jsonl")], stage="pretrain",
                                 format="text", max_seq_length=2048, overflow="split", text_eos="document"), None),
}


def relative_source(source: str) -> str:
    """``/any/checkout/shared/data/shishuo/x.jsonl:3`` -> ``shishuo/x.jsonl:3``; the digests must not
    depend on the checkout's location."""
    prefix = str(DATA) + "/"
    assert source.startswith(prefix), f"source {source!r} is not under {prefix}"
    return source[len(prefix):]


def column_digest(column, transform=None) -> str:
    """sha256 of a list<int> column's values (int64, little-endian) and offsets, or of a string column
    (each value passed through ``transform`` first, when given)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    h = hashlib.sha256()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = col.to_pylist()
        if transform is not None:
            values = [transform(v) for v in values]
        h.update(json.dumps(values, ensure_ascii=False).encode())
        return h.hexdigest()
    col = col.cast(pa.list_(pa.int64()))
    offsets = np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype="<i8")
    h.update((offsets - offsets[0]).tobytes())
    h.update(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype="<i8").tobytes())
    return h.hexdigest()


def digests(case: str, tokenizer, tmp_path) -> dict:
    import datasets

    settings, preset = CASES[case]
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **settings)
    data = prepare_data(cfg, cfg.chat_format_for(tokenizer), seed=42,
                        preset=load_preset(preset) if preset else None)
    tokenized = datasets.load_from_disk(data.report.cache_files[0]).with_format("arrow")[:]
    rows = data.rows.with_format("arrow")[:]
    r = data.report
    return {
        "counts": {"lines_read": r.lines_read, "records": r.records, "heldout": r.heldout, "examples": r.examples,
                   "rows": r.rows, "dropped": r.dropped, "split_chunks": r.split_chunks,
                   "supervised_tokens": r.supervised_tokens},
        "heldout_sources": [relative_source(str(c.source)) for c in data.heldout],
        "tokenized": {c: column_digest(tokenized.column(c), relative_source if c == "source" else None)
                      for c in ("input_ids", "labels", "source", "drop_reason")},
        "rows": {c: column_digest(rows.column(c)) for c in ("input_ids", "labels", "seq_lens")},
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundled_corpus_gives_the_stored_ids_labels_and_rows(case, qwen2_tokenizer, tmp_path):
    if not (DATA / "shishuo").is_dir():
        pytest.fail(f"real data missing: {DATA} (shared/ must sit beside the project root)")
    got = digests(case, qwen2_tokenizer, tmp_path)
    expected = json.loads(GOLDEN.read_text())[case]
    assert got == expected, f"{case}: digests changed; now\n{json.dumps(got, indent=1, ensure_ascii=False)}"


def test_column_digest_depends_on_values_and_boundaries_not_storage():
    a = pa.array([[1, 2], [3]], type=pa.list_(pa.int32()))
    assert column_digest(a) == column_digest(pa.chunked_array([pa.array([[1, 2]]), pa.array([[3]])]))
    assert column_digest(a) != column_digest(pa.array([[1], [2, 3]]))
    assert column_digest(a) != column_digest(pa.array([[1, 2], [4]]))


def test_source_digest_does_not_depend_on_where_the_checkout_sits():
    here = pa.array([f"{DATA}/shishuo/a.jsonl:1", f"{DATA}/shishuo/a.jsonl:2"])
    assert column_digest(here, relative_source) == column_digest(pa.array(["shishuo/a.jsonl:1", "shishuo/a.jsonl:2"]))
    with pytest.raises(AssertionError, match="is not under"):
        relative_source("/elsewhere/shishuo/a.jsonl:1")
