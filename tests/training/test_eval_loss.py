"""The evaluation loss: packed rows give the unpacked value, normalised like the training loss,
with the LM head at the supervised positions only (the default) or at every position.

One process, no DeepSpeed: ``PackloraTrainer.evaluate`` on the same examples packed into rows and
one per row, against a reference computed here example by example with a plain forward pass."""
import pytest
import torch

from tiny_assets import prepare, tiny_qwen2_config

CHATS = [(f"Question number {i}: how are you today?", "I am fine, thank you." * (1 + i % 3)) for i in range(10)]


@pytest.fixture(scope="module")
def model_and_data(chatml_tokenizer, tmp_path_factory):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("eval")
    (d / "chats.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                                     {"role": "assistant", "content": a}]}) + "\n"
                                           for u, a in CHATS))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2_config(len(chatml_tokenizer))))
    packed = prepare([d / "chats.jsonl"], chatml_tokenizer, max_seq_length=512, cache_dir=d / "c").rows
    unpacked = prepare([d / "chats.jsonl"], chatml_tokenizer, max_seq_length=512, packing=False, cache_dir=d / "c").rows
    assert len(packed) < len(unpacked) == len(CHATS)
    return model.eval(), packed, unpacked


def _evaluate(model, rows, tokenizer, tmp_path, normalization, batch_size=2, positions="supervised"):
    from transformers import TrainingArguments

    from packlora.data_utils.collator import PackedCollator
    from packlora.training.trainer import PackloraTrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=batch_size, report_to=[],
                             use_cpu=True, remove_unused_columns=False)
    trainer = PackloraTrainer(model=model, args=args, eval_dataset=rows, processing_class=tokenizer,
                              data_collator=PackedCollator(pad_token_id=0, loss_normalization=normalization),
                              lm_head_positions=positions, lm_head_chunk_tokens=7 if positions == "supervised" else None)
    return trainer.evaluate()["eval_loss"]


def _reference(model, unpacked, normalization) -> float:
    """Mean cross-entropy over every trained (shifted) label, or the mean of each example's mean."""
    per_example = []
    with torch.no_grad():
        for row in unpacked:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            ce = torch.nn.functional.cross_entropy(logits[keep].double(), target[keep], reduction="none")
            per_example.append(ce)
    if normalization == "per_token":
        return float(torch.cat(per_example).mean())
    return float(torch.stack([c.mean() for c in per_example]).mean())


@pytest.mark.parametrize("positions", ["supervised", "all"])
@pytest.mark.parametrize("normalization", ["per_token", "per_example"])
def test_packed_eval_loss_equals_unpacked_and_the_reference(model_and_data, chatml_tokenizer, tmp_path, normalization,
                                                            positions):
    model, packed, unpacked = model_and_data
    want = _reference(model, unpacked, normalization)
    got_packed = _evaluate(model, packed, chatml_tokenizer, tmp_path / "p", normalization, positions=positions)
    got_unpacked = _evaluate(model, unpacked, chatml_tokenizer, tmp_path / "u", normalization, batch_size=3,
                             positions=positions)
    assert got_packed == pytest.approx(want, rel=1e-5)
    assert got_unpacked == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("normalization", ["per_token", "per_example"])
def test_supervised_head_eval_loss_equals_full_logits(model_and_data, chatml_tokenizer, tmp_path, normalization):
    """``model.lm_head_positions: supervised`` (head and loss at trained positions only, in chunks
    of 7) gives today's full-logits evaluation loss to 1e-6."""
    model, packed, _ = model_and_data
    full = _evaluate(model, packed, chatml_tokenizer, tmp_path / "a", normalization, positions="all")
    assert _evaluate(model, packed, chatml_tokenizer, tmp_path / "s", normalization) == pytest.approx(full, rel=1e-6)


def test_per_example_differs_from_per_token_when_lengths_differ(model_and_data):
    model, _, unpacked = model_and_data
    assert abs(_reference(model, unpacked, "per_token") - _reference(model, unpacked, "per_example")) > 1e-3
