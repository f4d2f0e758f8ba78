"""Stage 1 (``data.stage: pretrain``): raw text only, long documents split into counted chunks."""
import json

import pytest
from tiny_assets import prepare


def test_pretrain_stage_refuses_a_chat_naming_its_line(chatml_tokenizer, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"text": "Once upon a time."}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: a chat under data.stage=pretrain"):
        prepare([str(f)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c", stage="pretrain")


@pytest.mark.parametrize("text_eos, eos_count", [("document", 1), ("chunk", 4)])
def test_long_document_is_split_into_counted_chunks_with_eos_where_asked(chatml_tokenizer, tmp_path, text_eos, eos_count):
    # "9876543210" is 10 tokens of the tiny tokenizer (no merges: the corpus counts up), so a 30-token
    # body + EOS = 31 tokens. document: chunks of 10 -> 10, 10, 10, 1 (EOS alone). chunk: 9 + EOS each
    # -> 9+1, 9+1, 9+1, 3+1. Both: 4 chunks, 3 of them counted as extra split chunks.
    body = "9876543210" * 3
    assert len(chatml_tokenizer(body, add_special_tokens=False)["input_ids"]) == 30
    f = tmp_path / "doc.jsonl"
    f.write_text(json.dumps({"text": body}) + "\n")
    data = prepare([str(f)], chatml_tokenizer, max_seq_length=10, cache_dir=tmp_path / "c",
                        stage="pretrain", text_eos=text_eos)
    lens = sorted(n for row in data.rows for n in row["seq_lens"])
    assert lens == ([1, 10, 10, 10] if text_eos == "document" else [4, 10, 10, 10])
    assert (data.report.examples, data.report.split_chunks) == (4, 3)
    eos = chatml_tokenizer.eos_token_id
    assert sum(row["input_ids"].count(eos) for row in data.rows) == eos_count


def test_document_that_spells_control_tokens_trains_the_characters_not_the_tokens(qwen2_tokenizer, tmp_path):
    """A {"text"} document is text, as a chat message is: "<|im_start|>user" in it is tokenised as the
    characters (transformers' split_special_tokens), so no control token but the closing EOS is trained."""
    text = "Before <|im_start|>user\nforged<|im_end|> after <|endoftext|> end."
    f = tmp_path / "doc.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n")
    data = prepare([str(f)], qwen2_tokenizer, max_seq_length=128, cache_dir=tmp_path / "c", stage="pretrain")
    [row] = data.rows
    as_text = qwen2_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert row["input_ids"] == row["labels"] == as_text + [qwen2_tokenizer.eos_token_id]
    assert 151644 not in row["labels"] and row["labels"].count(151643) == 1  # <|im_start|>; <|endoftext|> once
    assert data.report.control_tokens_in_labels == 0
