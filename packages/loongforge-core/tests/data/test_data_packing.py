"""Packing: compared token by token with a straightforward reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loongforge.data.errors import DataError
from loongforge.data.packing import (
    SAMPLE_KEYS,
    PackedTextDataset,
    TokenizedCorpus,
    collate,
    document_order,
    split_documents,
)
from loongforge.data.tokenizer import encode_documents


def reference_samples(docs_in_order: list[list[int]], S: int, pad: int):
    """Slow, obvious version of the documented semantics."""
    stream, doc_of = [], []
    for d, ids in enumerate(docs_in_order):
        stream += ids
        doc_of += [d] * len(ids)
    N, out, i = len(stream), [], 0
    while i * S < N - 1:
        start = i * S
        s = {k: [] for k in SAMPLE_KEYS}
        for t in range(S):
            p = start + t
            if p < N:
                s["tokens"].append(stream[p])
                s["labels"].append(stream[p + 1] if p + 1 < N else pad)
                s["loss_mask"].append(float(p + 1 < N and doc_of[p + 1] == doc_of[p]))
                s["segment_ids"].append(doc_of[p] - doc_of[start])
                new_doc = t == 0 or doc_of[p - 1] != doc_of[p]
                s["position_ids"].append(0 if new_doc else s["position_ids"][-1] + 1)
            else:  # padding: own segment, positions from 0, no loss
                s["tokens"].append(pad)
                s["labels"].append(pad)
                s["loss_mask"].append(0.0)
                first_pad = p == N
                s["segment_ids"].append(s["segment_ids"][-1] + 1 if first_pad else s["segment_ids"][-1])
                s["position_ids"].append(0 if first_pad else s["position_ids"][-1] + 1)
        out.append(s)
        i += 1
    return stream, out


@pytest.mark.parametrize("S", [7, 64, 1000])
def test_samples_match_reference(tokenizer, stories, S):
    docs = stories[:25]
    ds = PackedTextDataset(docs, tokenizer, S, seed=3)
    encoded = encode_documents(tokenizer, docs)
    in_order = [encoded[d] for d in ds.doc_order]
    stream, expected = reference_samples(in_order, S, tokenizer.pad_token_id)
    assert ds.token_stream.tolist() == stream
    assert len(ds) == len(expected)
    for i, exp in enumerate(expected):
        got = ds[i]
        for key in SAMPLE_KEYS:
            assert got[key].shape == (S,)
            assert got[key].tolist() == exp[key], (i, key)
        assert got["loss_mask"].dtype == torch.float32 and got["tokens"].dtype == torch.int64


def test_boundary_semantics_spelled_out(tokenizer):
    eos = tokenizer.eos_token_id
    docs = ["Tom ran.", "Lily sat down.", "Max was happy today."]
    enc = encode_documents(tokenizer, docs)
    S = sum(map(len, enc)) + 5  # everything in one padded sample
    s = PackedTextDataset(docs, tokenizer, S, shuffle=False)[0]
    n = sum(map(len, enc))
    tokens, labels, mask = s["tokens"].tolist(), s["labels"].tolist(), s["loss_mask"].tolist()
    assert labels[: n - 1] == tokens[1:n]  # labels are the next tokens
    ends = np.cumsum([len(e) for e in enc]) - 1  # positions of the EOS of each document
    for t in range(S):
        # loss on predicting every next token inside a document, EOS included; not from EOS onward
        assert mask[t] == (0.0 if t in ends or t >= n else 1.0)
        if t + 1 in ends:
            assert labels[t] == eos and mask[t] == 1.0
    starts = [0, *(ends[:-1] + 1)]
    assert [t for t in range(n) if s["position_ids"][t] == 0] == starts
    assert s["segment_ids"].tolist()[:n] == sum(([d] * len(e) for d, e in enumerate(enc)), [])
    assert set(s["segment_ids"].tolist()[n:]) == {3}  # padding is a segment of its own


def test_samples_cover_the_stream_and_chain_labels(tokenizer, stories):
    ds = PackedTextDataset(stories, tokenizer, 50, seed=1)
    stream = ds.token_stream
    joined = torch.cat([ds[i]["tokens"] for i in range(len(ds))]).numpy()
    assert (joined[: len(stream)] == stream).all()
    for i in range(len(ds) - 1):
        assert ds[i]["labels"][-1] == ds[i + 1]["tokens"][0]
    # every token but the first is predicted exactly once (mask aside)
    assert len(ds) == -(-(len(stream) - 1) // 50)


def test_drop_last(tokenizer, stories):
    full = PackedTextDataset(stories, tokenizer, 50, seed=1)
    dropped = PackedTextDataset(stories, tokenizer, 50, seed=1, drop_last=True)
    assert len(dropped) == (full.num_tokens - 1) // 50
    assert dropped[0]["loss_mask"].sum() > 0 and all(
        dropped[len(dropped) - 1]["tokens"] == full[len(dropped) - 1]["tokens"]
    )


def test_deterministic_and_seeded(tokenizer, stories):
    a = PackedTextDataset(stories, tokenizer, 32, seed=5)
    b = PackedTextDataset(TokenizedCorpus.from_texts(stories, tokenizer), tokenizer, 32, seed=5)
    c = PackedTextDataset(stories, tokenizer, 32, seed=6)
    for i in (0, 7, len(a) - 1, -1):
        for key in SAMPLE_KEYS:
            assert torch.equal(a[i][key], b[i][key])
    assert not np.array_equal(a.doc_order, c.doc_order)
    assert sorted(a.doc_order.tolist()) == list(range(len(stories)))
    assert PackedTextDataset(stories, tokenizer, 32, shuffle=False).doc_order.tolist() == list(
        range(len(stories))
    )
    with pytest.raises(IndexError):
        a[len(a)]


def test_doc_subset_and_split(tokenizer, stories):
    train_ids, valid_ids = split_documents(len(stories), 0.1, seed=0)
    assert len(valid_ids) == 8 and set(train_ids) | set(valid_ids) == set(range(len(stories)))
    assert not set(train_ids) & set(valid_ids)
    assert np.array_equal(split_documents(len(stories), 0.1, seed=0)[1], valid_ids)
    corpus = TokenizedCorpus.from_texts(stories, tokenizer)
    valid = PackedTextDataset(corpus, tokenizer, 40, doc_ids=valid_ids)
    assert sorted(valid.doc_order.tolist()) == valid_ids.tolist()
    assert valid.num_tokens == sum(len(corpus.document(d)) for d in valid_ids)
    assert np.array_equal(document_order(valid_ids, 0, True), valid.doc_order)


def test_too_little_data(tokenizer):
    with pytest.raises(DataError):
        PackedTextDataset(["Hi."], tokenizer, 100, drop_last=True)
    assert len(PackedTextDataset(["Hi."], tokenizer, 100)) == 1


def test_collate_makes_batches(tokenizer, stories):
    ds = PackedTextDataset(stories, tokenizer, 16)
    batch = collate([ds[0], ds[1], ds[2]])
    assert set(batch) == set(SAMPLE_KEYS)
    assert all(v.shape == (3, 16) for v in batch.values())
    assert batch["loss_mask"].dtype == torch.float32


def test_segment_ids_give_a_valid_block_causal_mask(tokenizer, stories):
    ds = PackedTextDataset(stories[:10], tokenizer, 128)
    for i in range(len(ds)):
        seg = ds[i]["segment_ids"]
        allowed = (seg[:, None] == seg[None, :]) & torch.ones(128, 128, dtype=torch.bool).tril()
        assert allowed.diagonal().all()  # no empty attention row
        assert (seg.diff() >= 0).all() and (seg.diff() <= 1).all()
