"""SFT data: formats, conversion, assistant-only loss masks (token by token), truncation, packing,
and data-parallel load balancing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from loongforge.data.convert import convert, iter_records, to_messages
from loongforge.data.errors import DataError
from loongforge.data.sampler import PretrainingSampler
from loongforge.data.sft import (
    BalancedSampler,
    ChatEncoder,
    SFTDataset,
    imbalance,
    pack_best_fit,
    read_conversations,
)
from loongforge.data.tokenizer import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a kind helper."},
    {"role": "user", "content": "What does a dog say?"},
    {"role": "assistant", "content": "A dog says woof."},
    {"role": "user", "content": "And a cow?"},
    {"role": "assistant", "content": "A cow says moo. It lives on the farm."},
]
RECORDS = {
    "messages": {"messages": MESSAGES},
    "sharegpt": {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in MESSAGES]},
    "alpaca": {"instruction": "What does a dog say?", "input": "", "output": "A dog says woof.",
               "system": "You are a kind helper."},
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny_stories")


def expected_chatml(tok, messages):
    """ids and mask built piece by piece: assistant content + its <|im_end|> carry loss."""
    ids, mask = [], []
    for m in messages:
        a = m["role"] == "assistant"
        for text, flag in (("<|im_start|>", 0), (m["role"] + "\n", 0), (m["content"], a), ("<|im_end|>", a), ("\n", 0)):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [float(flag)] * len(piece)
    return np.array(ids), np.array(mask, dtype=np.float32)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_assistant_mask_token_by_token(tok, tmp_path, fmt, suffix):
    from loongforge.data.convert import write_records

    path = tmp_path / f"data{suffix}"
    write_records(path, [RECORDS[fmt]])
    (messages,), skipped = read_conversations([str(path)])
    assert skipped == 0
    expected_messages = MESSAGES if fmt != "alpaca" else MESSAGES[:3]
    assert messages == expected_messages
    ids, mask = ChatEncoder(tok, "chatml").encode(messages)
    want_ids, want_mask = expected_chatml(tok, messages)
    assert ids.tolist() == want_ids.tolist()  # the piecewise tokenization is the real one here
    assert mask.tolist() == want_mask.tolist()
    loss_text = tok.decode(ids[mask == 1])
    print(f"{fmt}{suffix}: loss on {int(mask.sum())}/{len(ids)} tokens: {loss_text!r}")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert loss_text == "<|im_end|>".join(answers) + "<|im_end|>"

    # as a training sample: loss_mask[t] says whether labels[t] = ids[t+1] is an assistant token
    ds = SFTDataset([(ids, mask)], seq_length=len(ids) + 5, pad_id=tok.pad_token_id, pack=False)
    s = ds[0]
    n = len(ids) - 1
    assert s["tokens"][:n].tolist() == ids[:-1].tolist() and s["labels"][:n].tolist() == ids[1:].tolist()
    assert s["loss_mask"][:n].tolist() == mask[1:].tolist() and s["loss_mask"][n:].sum() == 0


def test_tokenizer_template_plain_template_and_loss_on_all(tok):
    # a tokenizer's own template (here a Llama-2-like one set on the tokenizer) is used with "tokenizer"
    tok2 = load_tokenizer("builtin:tiny_stories")
    tok2.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                          "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    msgs = [m for m in MESSAGES if m["role"] != "system"]
    ids, mask = ChatEncoder(tok2, "tokenizer").encode(msgs)
    assert tok2.decode(ids[mask == 1]) == " A dog says woof.<|endoftext|> A cow says moo. It lives on the farm.<|endoftext|>"
    ids, mask = ChatEncoder(tok, "plain").encode(msgs)
    assert tok.decode(ids[mask == 1]) == " A dog says woof.<|endoftext|> A cow says moo. It lives on the farm.<|endoftext|>"
    # a prompt ending in a space: the token " A" straddles the answer's start and carries loss
    straddle = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ids, mask = ChatEncoder(tok, straddle).encode(msgs)
    # (the newline after an answer is template formatting, not part of it: no loss)
    assert tok.decode(ids[mask == 1]) == " A dog says woof. A cow says moo. It lives on the farm."
    ids, mask = ChatEncoder(tok, "chatml", loss_on="all").encode(msgs)
    assert mask.all()
    with pytest.raises(DataError, match="no chat_template"):
        ChatEncoder(tok, "tokenizer")
    with pytest.raises(DataError, match="unknown template"):
        ChatEncoder(tok, "vicuna9")
    # a template that rewrites earlier turns cannot be diffed: refused by name
    bad = "{% for m in messages %}{{ m['content'] if loop.last else m['content'][:3] }}{% endfor %}"
    with pytest.raises(DataError, match="does not render incrementally"):
        ChatEncoder(tok, bad).encode(msgs)


@pytest.mark.parametrize("to", ["messages", "sharegpt", "alpaca"])
def test_convert_round_trip(tmp_path, to):
    src = tmp_path / "in.jsonl"
    convs = [MESSAGES, MESSAGES[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    dst = tmp_path / f"out_{to}.parquet"
    assert convert(src, dst, to) == 3
    back = [to_messages(r) for r in iter_records(dst)]
    assert back == convs  # multi-turn alpaca goes through 'history'
    if to == "alpaca":
        src.write_text(json.dumps({"messages": [MESSAGES[1], MESSAGES[1], MESSAGES[2]]}) + "\n")
        with pytest.raises(DataError, match="record 1: alpaca holds alternating user/assistant turns"):
            convert(src, tmp_path / "x.jsonl", "alpaca")


def test_json_array_sharegpt_system_and_alpaca_history(tmp_path):
    """The shapes public sets come in: a .json array (Alpaca), a top-level ShareGPT system prompt,
    Alpaca 'history'; a broken record names its file and record."""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "And a cow?", "input": "", "output": MESSAGES[4]["content"], "system": MESSAGES[0]["content"],
         "history": [[MESSAGES[1]["content"], MESSAGES[2]["content"]]]},
        {"system": MESSAGES[0]["content"],
         "conversations": [{"from": "human", "value": MESSAGES[1]["content"]}, {"from": "gpt", "value": MESSAGES[2]["content"]}]},
    ], indent=1))
    convs, skipped = read_conversations([str(path)])
    assert convs == [MESSAGES, MESSAGES[:3]] and skipped == 0
    path.write_text(json.dumps([{"conversations": [{"from": "narrator", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"alpaca.json: record 1: sharegpt turn with unknown 'from': 'narrator'"):
        read_conversations([str(path)])
    path.write_text(json.dumps([{"conversations": [{"from": "narrator", "value": "x"}]}, {"messages": MESSAGES}]))
    assert read_conversations([str(path)], on_error="skip") == ([MESSAGES], 1)


def test_truncation_packing_and_efficiency(tok):
    enc = ChatEncoder(tok, "chatml")
    convs, _ = read_conversations(["builtin:tiny_chat"])
    encoded = [enc.encode(m) for m in convs[:200]]
    packed = SFTDataset(encoded, seq_length=128, pad_id=tok.pad_token_id, pack=True, seed=3)
    plain = SFTDataset(encoded, seq_length=128, pad_id=tok.pad_token_id, pack=False)
    longest = max(len(i) for i, _ in encoded)
    assert packed.stats.truncated == sum(len(i) > 129 for i, _ in encoded) > 0 and longest > 129
    print("packed:  ", packed.stats.summary(), "\nunpacked:", plain.stats.summary())
    assert packed.stats.packing_efficiency > 0.9 > plain.stats.packing_efficiency
    assert packed.stats.loss_tokens == plain.stats.loss_tokens
    # every conversation in exactly one sequence, segments/positions restart per conversation
    assert sorted(i for b in packed.bins for i in b) == list(range(len(packed.lengths)))
    s = packed[0]
    starts = np.flatnonzero(np.diff(s["segment_ids"].numpy(), prepend=-1))
    assert (s["position_ids"].numpy()[starts] == 0).all()
    assert sum(packed.sample_lengths(0)) <= 128
    assert pack_best_fit([5, 3, 3, 2, 7], 8, seed=0) == pack_best_fit([5, 3, 3, 2, 7], 8, seed=0)


class FakeLengths:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def sample_lengths(self, i):
        return self.lengths[i]


def test_dp_load_balancing_permutes_global_batch_and_lowers_imbalance():
    rng = np.random.default_rng(0)
    # skewed: most sequences hold many short conversations, a few one long conversation
    data = [[int(rng.integers(20, 60)) for _ in range(8)] if rng.random() < 0.8 else [int(rng.integers(800, 1000))]
            for _ in range(400)]
    ds = FakeLengths(data)
    G, dp, mbs = 32, 4, 2
    a, b = 1.0, 1.0 / (12 * 128)
    logs = []
    samplers = [BalancedSampler(ds, mbs, G, dp_rank=r, dp_size=dp, seed=5, cost_a=a, cost_b=b,
                                on_batch=(lambda s, x, y: logs.append((x, y))) if r == 0 else None) for r in range(dp)]
    plain = PretrainingSampler(len(ds), mbs, G, seed=5)
    iters = [iter(s) for s in samplers]
    steps_per = G // (mbs * dp)
    for step in range(5):
        got = [sum((next(it) for _ in range(steps_per)), []) for it in iters]
        assert sorted(sum(got, [])) == sorted(plain.global_batch(step))  # same content, re-split
        assert all(len(g) == G // dp for g in got)
    before = float(np.mean([x for x, _ in logs]))
    after = float(np.mean([y for _, y in logs]))
    print(f"dp=4 imbalance (max/mean rank cost): contiguous {before:.3f} -> balanced {after:.3f}")
    assert after < before and after < 1.1
    # resume: a sampler started at consumed samples of step 3 continues exactly
    resumed = BalancedSampler(ds, mbs, G, dp_rank=1, dp_size=dp, seed=5, cost_a=a, cost_b=b, consumed_samples=3 * G)
    fresh = iter(BalancedSampler(ds, mbs, G, dp_rank=1, dp_size=dp, seed=5, cost_a=a, cost_b=b))
    for _ in range(3 * steps_per):
        next(fresh)
    r = iter(resumed)
    assert [next(r) for _ in range(2 * steps_per)] == [next(fresh) for _ in range(2 * steps_per)]
    assert imbalance([[0], [1]], [1.0, 1.0]) == 1.0
