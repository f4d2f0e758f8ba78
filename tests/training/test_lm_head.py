"""The supervised-only, chunked LM head (``training/lm_head.py``) gives today's loss and gradients.

Reference: ``lm_head_positions: all``, today's path (full logits; ``per_token`` through transformers'
own model loss, ``per_example`` through ``training.loss.weighted_causal_lm_loss``), on the same model
and batch, through ``PackloraTrainer.compute_loss`` with the step's ``num_items_in_batch`` as in
training. fp32, one process. Tolerances (issue 21): loss 1e-6 relative, every trainable gradient
1e-5 relative to its largest entry.

The batch: 3 packed rows with assistant-only style labels (a prompt span of each segment is -100,
and the collator masks each segment's first label). Row 1 has no trained label at all; row 2 ends
in padding. So the rows keep different positions and counts (8, 0 and 6; 14 of 3 x 13 = 39).
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, TrainingArguments

import packlora.training.packed_attention  # noqa: F401  (registers packed_sdpa)
from packlora.data_utils.collator import PackedCollator
from packlora.core.errors import InputError
from packlora.training.lm_head import (LmHeadError, auto_chunk_tokens, chunked_token_ce, head_returns_token_ce,
                                       output_head, prepare_head_for_zero3, supervised_positions, supervised_token_ce)
from packlora.training.trainer import PackloraTrainer
from tiny_assets import tiny_qwen2_config, trainable_grads

VOCAB = 97
SEQ_LENS = [[6, 7], [5, 4], [9]]  # row 2 is padded to 13 with 4 pad tokens
PROMPT = {  # per row, per segment: how many leading tokens are prompt (label -100)
    0: [2, 3],
    1: [5, 4],  # the whole row is prompt: no trained label
    2: [3],
}
TRAINED_PER_ROW = [8, 0, 6]  # labels after the shift: segment length - prompt, summed over the row's segments

MODELS = {
    # name: (tie_word_embeddings, LoRA target modules or None for full fine-tuning)
    "tied_lora_qv": (True, ["q_proj", "v_proj"]),
    "untied_lora_on_lm_head": (False, ["q_proj", "v_proj", "lm_head"]),
    "tied_lora_on_lm_head": (True, ["q_proj", "lm_head"]),
    "tied_full_finetune": (True, None),
}


def _model(name: str, attn: str = "sdpa"):
    tied, targets = MODELS[name]
    torch.manual_seed(0)
    cfg = tiny_qwen2_config(VOCAB, tie_word_embeddings=tied, initializer_range=0.2)
    cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg), attn_implementation=attn, dtype=torch.float32)
    if targets is not None:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    return model.train()


def _rows() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for r, lens in enumerate(SEQ_LENS):
        ids = torch.randint(3, VOCAB, (sum(lens),), generator=g).tolist()
        labels, start = [], 0
        for n, prompt in zip(lens, PROMPT[r]):
            labels += [-100] * prompt + ids[start + prompt : start + n]
            start += n
        rows.append({"input_ids": ids, "labels": labels, "seq_lens": lens})
    return rows


def _batch(normalization: str) -> dict:
    batch = PackedCollator(pad_token_id=0, loss_normalization=normalization)(_rows())
    assert (batch["labels"][:, 1:] != -100).sum(1).tolist() == TRAINED_PER_ROW
    return batch


def _trainer(model, tmp_path, positions: str, chunk=None) -> PackloraTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    return PackloraTrainer(model=model, args=args, lm_head_positions=positions, lm_head_chunk_tokens=chunk)


def _loss_and_grads(model, tmp_path, positions, normalization, chunk=None):
    trainer = _trainer(model, tmp_path / positions, positions, chunk)
    batch = _batch(normalization)
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), trainable_grads(model)


def _assert_same(got, want, label=""):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6), label
    assert grads.keys() == ref_grads.keys() and grads
    for k, g in ref_grads.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{label} {k}: no gradient in the reference"
        assert (grads[k] - g).abs().max().item() <= 1e-5 * scale, f"{label} {k}"


@pytest.mark.parametrize("normalization", ["per_token", "per_example"])
@pytest.mark.parametrize("attn", ["sdpa", "packed_sdpa", "eager"])
def test_supervised_head_gives_the_full_logits_loss_and_gradients(tmp_path, attn, normalization):
    model = _model("tied_lora_qv", attn)
    want = _loss_and_grads(model, tmp_path, "all", normalization)
    got = _loss_and_grads(model, tmp_path, "supervised", normalization, chunk=4)  # 14 positions: chunks 4, 4, 4, 2
    _assert_same(got, want, f"{attn} {normalization}")


@pytest.mark.parametrize("name", ["untied_lora_on_lm_head", "tied_lora_on_lm_head", "tied_full_finetune"])
def test_supervised_head_is_exact_with_lora_on_lm_head_and_tied_or_trained_embeddings(tmp_path, name):
    model = _model(name)
    want = _loss_and_grads(model, tmp_path, "all", "per_token")
    got = _loss_and_grads(model, tmp_path, "supervised", "per_token", chunk=4)
    _assert_same(got, want, name)
    if MODELS[name][1] and "lm_head" in MODELS[name][1]:
        assert any("lm_head.lora_B" in k for k in got[1])  # the head's own LoRA got its gradient here
    if MODELS[name][1] is None:
        assert "model.embed_tokens.weight" in got[1]  # tied: one weight, gradients from both of its uses


@pytest.mark.parametrize("chunk", [1, 5, 14, 1000, None])
def test_loss_does_not_depend_on_the_chunk_size(tmp_path, chunk):
    model = _model("tied_lora_qv")
    want = _loss_and_grads(model, tmp_path, "all", "per_example")
    _assert_same(_loss_and_grads(model, tmp_path, "supervised", "per_example", chunk=chunk), want, f"chunk {chunk}")


def test_a_batch_without_any_trained_label_gives_loss_zero_and_zero_gradients(tmp_path):
    model = _model("tied_lora_qv")
    trainer = _trainer(model, tmp_path, "supervised")
    rows = [r for r in _rows()]
    rows = [dict(r, labels=[-100] * len(r["labels"])) for r in rows]
    for normalization in ("per_token", "per_example"):
        batch = PackedCollator(pad_token_id=0, loss_normalization=normalization)(rows)
        for num_items in (trainer._get_num_items_in_batch([batch], torch.device("cpu")), None):
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
            loss.backward()
            assert loss.item() == 0.0 and not torch.isnan(loss)
            assert all(torch.equal(g, torch.zeros_like(g)) for g in trainable_grads(model).values())


def test_head_module_is_called_once_on_the_supervised_positions_only(tmp_path):
    """The model's head call (hooks included) happens once, on [N, hidden] with N the trained labels
    after the shift (14 of the batch's 3 x 13 = 39 positions), and returns [N] cross-entropies."""
    model = _model("untied_lora_on_lm_head")
    head = output_head(model)
    assert type(head).__name__ == "Linear" and hasattr(head, "lora_A")  # PEFT's LoRA layer, not the bare Linear
    calls = []
    handle = head.register_forward_hook(lambda m, args, out: calls.append((tuple(args[0].shape), tuple(out.shape))))
    batch = _batch("per_token")
    labels = batch.pop("labels")
    ce, keep, _ = supervised_token_ce(model, batch, labels, chunk_tokens=4)
    handle.remove()
    assert calls == [((14, 64), (14,))]
    assert keep.sum(1).tolist() == TRAINED_PER_ROW and ce.shape == (14,) and ce.dtype == torch.float32
    assert "forward" not in head.__dict__  # the module's own forward is back after the call


def test_after_a_supervised_step_the_model_gives_full_logits_to_generate(tmp_path):
    """What reads logits outside the loss (the runaway evaluation's ``generate`` between steps) gets
    the head's ordinary ``[B, L, V]`` logits after a supervised training step, unchanged, also
    through a LoRA on ``lm_head``: the head's forward is swapped for one model call only."""
    model = _model("untied_lora_on_lm_head")
    ids = torch.tensor([[5, 17, 42, 8, 63, 21]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        greedy = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    loss, grads = _loss_and_grads(model, tmp_path, "supervised", "per_token", chunk=4)
    assert loss.item() > 0 and grads
    with torch.no_grad():
        after = model(input_ids=ids).logits
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0), greedy)
    assert after.shape == (1, 6, VOCAB) and torch.equal(after, before)


def _spied_head(trainable: bool):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(trainable)
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return head(x)

    return head, forward, seen


HIDDEN = torch.randn(11, 8, generator=torch.Generator().manual_seed(1))
TARGET = torch.tensor([3, 7, -100, 0, 49, 12, 5, 5, 1, 2, 30])


def _reference_ce(weight, hidden):
    """log-sum-exp minus the target logit, written out (no cross_entropy), 0 where the target is -100."""
    logits = hidden @ weight.T
    ce = torch.logsumexp(logits, -1) - logits.gather(1, TARGET.clamp(min=0)[:, None])[:, 0]
    return torch.where(TARGET == -100, torch.zeros_like(ce), ce)


@pytest.mark.parametrize("trainable", [False, True])
def test_chunks_cover_every_row_once_and_give_the_unchunked_loss_and_gradients(trainable):
    """A frozen head projects each chunk once (its hidden-state gradient is taken in the forward);
    a trainable head (LoRA on lm_head, full fine-tuning) recomputes each chunk in the backward."""
    head, forward, seen = _spied_head(trainable)
    hidden = HIDDEN.clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, 11)  # per-row upstream gradients, as per_example's weights give
    (chunked_token_ce(forward, hidden, TARGET, chunk_tokens=4, trainable_head=trainable) * weights).sum().backward()
    assert seen[:3] == [4, 4, 3] and sorted(seen[3:]) == ([3, 4, 4] if trainable else [])  # backward: any order
    ref_hidden = HIDDEN.clone().requires_grad_()
    ref_weight = head.weight.detach().clone().requires_grad_(trainable)
    (_reference_ce(ref_weight, ref_hidden) * weights).sum().backward()
    assert torch.allclose(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)
    if trainable:
        assert torch.allclose(head.weight.grad, ref_weight.grad, rtol=1e-5, atol=1e-6)


def test_hand_written_logit_gradient_is_softmax_minus_onehot_and_zero_for_ignored_rows():
    from packlora.training.lm_head import _ce_and_logit_grad

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 1.0, 1.0]])
    ce, grad = _ce_and_logit_grad(logits, torch.tensor([2, 3, -100]))
    p1 = torch.tensor([1.0, 2.0, 3.0, 4.0]).exp() / torch.tensor([1.0, 2.0, 3.0, 4.0]).exp().sum()
    assert torch.allclose(ce, torch.stack([torch.tensor(4.0).log(), -p1[3].log(), torch.tensor(0.0)]), atol=1e-6)
    assert torch.allclose(grad, torch.stack([torch.tensor([0.25, 0.25, -0.75, 0.25]), p1 - torch.tensor([0, 0, 0, 1.0]),
                                             torch.zeros(4)]), atol=1e-6)
    assert logits[1].tolist() == [1.0, 2.0, 3.0, 4.0]  # the logits themselves are left alone


def test_without_gradients_chunks_run_once_and_equal_the_reference():
    head, forward, seen = _spied_head(False)
    with torch.no_grad():
        got = chunked_token_ce(forward, HIDDEN, TARGET, chunk_tokens=4)
    assert seen == [4, 4, 3]
    assert torch.allclose(got, _reference_ce(head.weight, HIDDEN), rtol=1e-6, atol=1e-6)


def test_supervised_positions_follow_the_models_label_shift():
    labels = torch.tensor([[-100, 10, 11, -100, -100, 12], [-100, -100, -100, -100, -100, -100]])
    keep, target = supervised_positions(labels)
    assert keep.tolist() == [[True, True, False, False, True, False], [False] * 6]
    assert target.tolist() == [10, 11, 12]


def test_a_model_that_ignores_a_boolean_logits_to_keep_is_refused_with_the_fix():
    class OldStyleLM(torch.nn.Module):  # slices logits_to_keep the pre-5.x way, or not at all
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.lm_head = torch.nn.Linear(8, VOCAB, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, logits_to_keep=0, **kwargs):
            return type("Out", (), {"logits": self.lm_head(self.embed(input_ids))})()

    labels = torch.tensor([[-100, 5, 6, 7]])
    with pytest.raises(LmHeadError, match="lm_head_positions: all"):
        supervised_token_ce(OldStyleLM(), {"input_ids": torch.tensor([[1, 2, 3, 4]])}, labels)


def test_a_model_without_output_embeddings_is_refused_as_a_user_error_with_the_fix():
    """A packlora InputError, so ``packlora train`` prints it in one line rather than as a bug."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = tiny_qwen2_config(VOCAB)
    cfg.pop("model_type")
    with pytest.raises(InputError, match="Qwen2Model has no output embeddings.*set it to all"):
        output_head(Qwen2Model(Qwen2Config(**cfg)))


def test_a_model_that_rescales_its_logits_after_the_head_is_refused_with_the_fix():
    """Gemma-2 softcaps, Cohere and Granite scale the head's output before returning it; applied to
    the per-position cross-entropy that would silently change the loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=30.0))
    batch = _batch("per_token")
    labels = batch.pop("labels")
    with pytest.raises(LmHeadError, match="post-processes its logits.*model.lm_head_positions: all"):
        supervised_token_ce(model, batch, labels)
    model.config.final_logit_softcapping = None  # the same model without it is scored, exactly
    ce, keep, _ = supervised_token_ce(model, dict(batch), labels, chunk_tokens=4)
    logits = model(**batch).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    assert ce.sum().item() == pytest.approx(want.item(), rel=1e-6)


def test_under_zero3_only_a_head_with_submodules_becomes_a_deepspeed_leaf_module():
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    lora_head, plain = _model("untied_lora_on_lm_head"), _model("tied_lora_qv")
    assert not prepare_head_for_zero3(lora_head)  # ZeRO-3 off: nothing to do
    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    try:
        assert prepare_head_for_zero3(lora_head) and output_head(lora_head)._z3_leaf is True
        assert not prepare_head_for_zero3(plain) and not getattr(output_head(plain), "_z3_leaf", False)
    finally:
        unset_hf_deepspeed_config()


def test_head_forward_is_restored_after_an_error():
    head = torch.nn.Linear(4, 10)
    with pytest.raises(LmHeadError):
        with head_returns_token_ce(head, torch.tensor([1, 2]), chunk_tokens=2):
            head(torch.randn(3, 4))  # 3 rows for 2 targets
    assert "forward" not in head.__dict__ and head(torch.randn(3, 4)).shape == (3, 10)


def test_auto_chunk_keeps_one_chunk_of_float32_logits_near_64_mib():
    assert auto_chunk_tokens(151_936) == 110 and 110 * 151_936 * 4 <= 64 * 2**20 < 111 * 151_936 * 4
