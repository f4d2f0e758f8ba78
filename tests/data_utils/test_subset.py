"""packlora subset: reproducible, length- and turn-stratified, with a manifest and clear errors."""
import json

import pytest

from packlora.data_utils.subset import draw_subset, largest_remainder, main, make_subset, manifest_path
from tiny_assets import QWEN2_TOKENIZER, SHARED

ZHS = SHARED / "data" / "zhanghenshui" / "stage2_continue.jsonl"
SHISHUO = SHARED / "data" / "shishuo" / "stage2_rewrite.jsonl"


def test_real_corpus_subset_is_byte_identical_and_keeps_length_quantiles(tmp_path):
    # The done-when: --ratio 0.2 --seed 1 twice on the real 张恨水 file.
    argv = ["--input", str(ZHS), "--ratio", "0.2", "--seed", "1", "--tokenizer", str(QWEN2_TOKENIZER)]
    assert main([*argv, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main([*argv, "--output", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    m = json.loads(manifest_path(tmp_path / "a.jsonl").read_text())
    assert m["counts"]["source"] == 3146 and m["counts"]["subset"] == 629  # round(0.2 * 3146)
    assert m["length_unit"].startswith("tokens")
    src, sub = m["length_quantiles"]["source"], m["length_quantiles"]["subset"]
    assert src["p50"] == 598  # the Qwen2 token count of the contents (613 with the chat template)
    for q in ("p10", "p25", "p50", "p75", "p90", "p99", "mean"):
        assert abs(sub[q] - src[q]) <= 0.05 * src[q], (q, src[q], sub[q])
    # every output line is a source line, in source order
    src_lines = ZHS.read_bytes().splitlines(keepends=True)
    out_lines = (tmp_path / "a.jsonl").read_bytes().splitlines(keepends=True)
    positions = [src_lines.index(line) for line in out_lines]
    assert positions == sorted(positions) and len(set(positions)) == 629
    import hashlib

    assert m["source_sha256"] == hashlib.sha256(ZHS.read_bytes()).hexdigest()


def test_two_turn_chats_keep_their_share(tmp_path):
    # 世说新语: 2945 one-turn, 489 two-turn chats; 20% of each is 589 and 98 (97.8 rounded up).
    m = make_subset(SHISHUO, tmp_path / "s.jsonl", 0.2, seed=3)
    assert m["counts"]["source_by_assistant_turns"] == {"1": 2945, "2": 489}
    assert m["counts"]["subset_by_assistant_turns"] == {"1": 589, "2": 98}
    assert m["length_unit"] == "characters"


def test_a_different_seed_draws_a_different_subset(tmp_path):
    a = make_subset(SHISHUO, tmp_path / "a.jsonl", 0.1, seed=1)
    b = make_subset(SHISHUO, tmp_path / "b.jsonl", 0.1, seed=2)
    assert a["counts"]["subset"] == b["counts"]["subset"] == 343
    assert a["output_sha256"] != b["output_sha256"]


def test_allocation_is_proportional_with_largest_remainders():
    assert largest_remainder([2945, 489], 687) == [589, 98]
    assert largest_remainder([1, 1, 1, 1], 2) == [1, 1, 0, 0]
    # a 100-record group in 10 length bins at 20%: exactly 2 per bin
    keep = draw_subset(list(range(100)), [1] * 100, 0.2, seed=0)
    assert [sum(10 * b <= i < 10 * (b + 1) for i in keep) for b in range(10)] == [2] * 10


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2"])
def test_bad_ratio_is_refused(tmp_path, capsys, ratio):
    assert main(["--input", str(SHISHUO), "--output", str(tmp_path / "o.jsonl"), "--ratio", ratio, "--seed", "1"]) == 1
    assert "--ratio must be in (0, 1], e.g. 0.2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_input_and_tiny_ratio_are_clear_errors(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--ratio", "0.2", "--seed", "1"]) == 1
    assert f"{tmp_path / 'nope.jsonl'}: --input file does not exist" in capsys.readouterr().err
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"--ratio 0.1 of 2 records rounds to 0; raise the ratio to at least 0.25"):
        make_subset(small, tmp_path / "o.jsonl", 0.1, seed=1)


def test_streamed_subset_gives_the_bytes_of_the_whole_file_version(tmp_path, monkeypatch):
    """The subset streams (two passes, ``SCAN_BATCH`` records per tokenizer call): its output is the
    one the earlier whole-file version wrote (sha256 stored from commit 7b05488), whatever the batch."""
    from packlora.data_utils import subset

    before = "d1f7e3a872696a007a9405df192593d3f4cbfecd2368b6602f38454f664192ce"
    m = make_subset(ZHS, tmp_path / "a.jsonl", 0.2, seed=1, tokenizer_dir=str(QWEN2_TOKENIZER))
    monkeypatch.setattr(subset, "SCAN_BATCH", 7)  # 3146 records: many batches, the last one partial
    n = make_subset(ZHS, tmp_path / "b.jsonl", 0.2, seed=1, tokenizer_dir=str(QWEN2_TOKENIZER))
    assert m["output_sha256"] == n["output_sha256"] == before
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert m["length_quantiles"] == n["length_quantiles"]


def test_input_changed_between_the_two_passes_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    from packlora.data_utils import subset
    from packlora.data_utils.records import DataFileError

    src = tmp_path / "in.jsonl"
    src.write_bytes(SHISHUO.read_bytes())
    real_scan = subset._scan

    def scan_then_append(path, tokenizer):
        out = real_scan(path, tokenizer)
        with open(path, "ab") as f:  # another writer appends after the first pass
            f.write(SHISHUO.read_bytes().splitlines(keepends=True)[0])
        return out

    monkeypatch.setattr(subset, "_scan", scan_then_append)
    with pytest.raises(DataFileError, match=r"in\.jsonl.*changed while the subset was drawn"):
        make_subset(src, tmp_path / "out.jsonl", 0.2, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
