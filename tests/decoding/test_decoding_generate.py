from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from packlora.data_utils.chat_format import ChatFormat
from tiny_assets import ENDOFTEXT, IM_END, IM_START, tiny_model
from torch import nn

from packlora.decoding.generate import Reply, Sampling, generate_replies

HELLO = [{"role": "user", "content": "Hello!"}]
CONVERSATIONS = [  # three prompt lengths, so a batch of them is left-padded
    HELLO,
    [{"role": "system", "content": "You are a scholar."},
     {"role": "user", "content": "Rewrite this sentence in the style of an old novel, please."}],
    [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps."},
     {"role": "user", "content": "over the lazy dog?"}],
]


class ScriptedHead(nn.Module):
    """Replaces ``lm_head``: reads the current token back from the final hidden state and puts
    all the probability on ``script[token]``.

    With every attention ``o_proj`` and MLP ``down_proj`` zeroed, the residual stream at a position
    is exactly that token's embedding (scaled by the final RMSNorm, whose weight is all ones), so
    the nearest embedding by cosine is the current token.
    """

    def __init__(self, embedding: torch.Tensor, script: dict[int, int], filler: int):
        super().__init__()
        self.register_buffer("unit", F.normalize(embedding.detach(), dim=-1))
        table = torch.full((embedding.shape[0],), filler, dtype=torch.long)
        for current, following in script.items():
            table[current] = following
        self.register_buffer("table", table)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V) float32
        current = (F.normalize(hidden.float(), dim=-1) @ self.unit.T).argmax(-1)
        return F.one_hot(self.table[current], self.unit.shape[0]).float() * 30.0


@pytest.fixture
def scripted_model(chatml_tokenizer):
    """A real tiny Qwen2 that, after the generation prompt's final newline, writes
    ``Hello!<|im_end|><|im_start|>user\\n`` and then starts over: a chat model running on into
    a new turn unless it stops at <|im_end|>."""
    enc = lambda s: chatml_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert [chatml_tokenizer.decode([t]) for t in enc("Hello!")] == ["He", "ll", "o", "!"]
    cycle = enc("Hello!") + [IM_END, IM_START] + enc("user\n")  # ends with "\n", as the prompt does
    assert len(set(cycle)) == len(cycle) == 10
    model = tiny_model(len(chatml_tokenizer), tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    script = {a: b for a, b in zip(cycle[-1:] + cycle[:-1], cycle)}
    model.lm_head = ScriptedHead(model.model.embed_tokens.weight, script, filler=enc("?")[0])
    every_id = torch.arange(len(chatml_tokenizer))[None]
    assert torch.equal(model(every_id).logits.argmax(-1)[0], model.lm_head.table)  # reads back every token
    return model


def test_reply_stops_at_im_end_and_excludes_it(chatml_tokenizer, scripted_model):
    [reply] = generate_replies(scripted_model, ChatFormat(chatml_tokenizer), [HELLO], stop_ids=[IM_END, ENDOFTEXT], max_new_tokens=20)
    assert reply == Reply(
        text="Hello!", token_ids=tuple(chatml_tokenizer.encode("Hello!")), stop_reason="stop_id", stop_id=IM_END,
        num_new_tokens=5,
    )


@pytest.mark.parametrize("stop_ids", [[IM_END, ENDOFTEXT], [ENDOFTEXT, IM_END]])
def test_generation_ends_at_the_stop_instead_of_running_to_max_new_tokens(chatml_tokenizer, scripted_model, stop_ids):
    calls = []
    scripted_model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    generate_replies(scripted_model, ChatFormat(chatml_tokenizer), [HELLO], stop_ids=stop_ids, max_new_tokens=50)
    assert len(calls) == 5  # one forward per generated token: "He" "ll" "o" "!" <|im_end|>


def test_without_im_end_in_stop_ids_it_runs_into_the_next_turn(chatml_tokenizer, scripted_model):
    # eos_token alone (<|endoftext|>, as in a Qwen2 base tokenizer) never fires: the reply runs on,
    # and the role markers it writes stay visible in the text.
    [reply] = generate_replies(scripted_model, ChatFormat(chatml_tokenizer), [HELLO], stop_ids=[ENDOFTEXT], max_new_tokens=14)
    assert reply.text == "Hello!<|im_end|><|im_start|>user\nHello!"
    assert (reply.stop_reason, reply.stop_id, reply.num_new_tokens, len(reply.token_ids)) == (
        "max_new_tokens", None, 14, 14,
    )


def test_stop_as_first_token_gives_empty_reply(chatml_tokenizer, scripted_model):
    # "He" is the script's first reply token.
    he = chatml_tokenizer.encode("He")[0]
    [reply] = generate_replies(scripted_model, ChatFormat(chatml_tokenizer), [HELLO], stop_ids=[he], max_new_tokens=5)
    assert reply == Reply(text="", token_ids=(), stop_reason="stop_id", stop_id=he, num_new_tokens=1)


def _manual_greedy(model, tokenizer, conversation, n: int, repetition_penalty: float = 1.0) -> list[int]:
    """Reference decoder: full forward pass per step, no cache, no padding, argmax of raw logits;
    with a repetition penalty, the logit of every id already in the row is divided by it when
    positive and multiplied by it when negative first (CTRL, arXiv:1909.05858)."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True,
                                        sanitize_control_tokens=True)["input_ids"]
    ids, new = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1].clone()
            seen = ids[0].unique()
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition_penalty,
                                       logits[seen] * repetition_penalty)
            nxt = logits.argmax().item()
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


def test_rows_stop_on_their_own_and_batching_with_left_padding_changes_nothing(chatml_tokenizer, random_model):
    n = 12
    full = [_manual_greedy(random_model, chatml_tokenizer, c, n) for c in CONVERSATIONS]
    stop = full[0][3]  # row 0 stops at its 4th token; the others wherever (if ever) it shows up
    assert stop not in full[0][:3]
    expected = []
    for row in full:
        k = row.index(stop) if stop in row else None
        expected.append((tuple(row[:k]), "stop_id", k + 1) if k is not None else (tuple(row), "max_new_tokens", n))
    assert {e[1] for e in expected} == {"stop_id", "max_new_tokens"}  # the batch really mixes both

    # Settings in model.generation_config must not leak into greedy decoding.
    random_model.generation_config.repetition_penalty = 10.0
    random_model.train()
    chatml_tokenizer.padding_side = "right"
    for batch_size in (3, 2, 1):
        replies = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, [stop], max_new_tokens=n, batch_size=batch_size
        )
        assert [(r.token_ids, r.stop_reason, r.num_new_tokens) for r in replies] == expected, batch_size
        assert [r.text for r in replies] == [chatml_tokenizer.decode(list(e[0])) for e in expected]
    assert random_model.training and chatml_tokenizer.padding_side == "right"  # both restored/untouched


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(chatml_tokenizer, random_model):
    kwargs = dict(stop_ids=[IM_END], max_new_tokens=10)
    hot = dict(do_sample=True, temperature=5.0, top_p=0.95)
    rng = torch.get_rng_state()
    a = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, sampling=Sampling(seed=0, **hot), **kwargs)
    b = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, sampling=Sampling(seed=0, **hot), **kwargs)
    c = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, sampling=Sampling(seed=1, **hot), **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == b and a != c


def test_repetition_penalty_divides_the_logits_of_ids_already_in_the_row(chatml_tokenizer, random_model):
    n = 16
    plain = [tuple(_manual_greedy(random_model, chatml_tokenizer, c, n)) for c in CONVERSATIONS]
    penalised = [tuple(_manual_greedy(random_model, chatml_tokenizer, c, n, repetition_penalty=3.0)) for c in CONVERSATIONS]
    assert plain != penalised  # the penalty changes what this model writes
    no_stop = [len(chatml_tokenizer)]  # an id the model cannot write: every row runs to max_new_tokens
    got = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, no_stop, max_new_tokens=n, batch_size=3,
                           sampling=Sampling(repetition_penalty=3.0))
    assert [r.token_ids for r in got] == penalised


def test_top_k_1_sampling_is_greedy_whatever_the_temperature(chatml_tokenizer, random_model):
    greedy = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, [IM_END], max_new_tokens=10)
    hot = dict(do_sample=True, temperature=50.0, seed=0)
    top1 = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, [IM_END], max_new_tokens=10,
                            sampling=Sampling(top_k=1, **hot))
    untruncated = generate_replies(random_model, ChatFormat(chatml_tokenizer), CONVERSATIONS, [IM_END], max_new_tokens=10,
                                   sampling=Sampling(**hot))
    assert top1 == greedy and untruncated != greedy


def test_no_conversations_gives_no_replies(chatml_tokenizer, random_model):
    assert generate_replies(random_model, ChatFormat(chatml_tokenizer), [], stop_ids=[IM_END]) == []


def test_conversation_ending_with_assistant_raises_with_its_index(chatml_tokenizer, random_model):
    convs = [HELLO, HELLO + [{"role": "assistant", "content": "Hi."}]]
    with pytest.raises(ValueError, match=r"conversations\[1\] ends with an assistant message"):
        generate_replies(random_model, ChatFormat(chatml_tokenizer), convs, stop_ids=[IM_END])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.7), "temperature=0.7 only applies when sampling"),
        (dict(seed=3), "seed=3 only applies when sampling"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(max_new_tokens=0, batch_size=0), "max_new_tokens must be a positive int, got 0; batch_size"),
        (dict(stop_ids=[]), "stop_ids is empty"),
        (dict(top_k=20), "top_k=20 only applies when sampling"),
        (dict(do_sample=True, top_k=-1), "top_k must be an int >= 0"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0 \(1.0 = off\), got 0.0"),
    ],
)
def test_bad_settings_raise(chatml_tokenizer, random_model, kwargs, message):
    kwargs = {"stop_ids": [IM_END], **kwargs}
    sampling_keys = {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed"}
    with pytest.raises(ValueError, match=message):
        sampling = Sampling(**{k: v for k, v in kwargs.items() if k in sampling_keys})
        generate_replies(random_model, ChatFormat(chatml_tokenizer), [HELLO], sampling=sampling,
                         **{k: v for k, v in kwargs.items() if k not in sampling_keys})
