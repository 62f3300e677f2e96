"""Top-k selection: never the future, never another packed document; packed == per-document."""

from __future__ import annotations

import pytest
import torch
from loongforge_llm.dsa.indexer import indexer_topk
from loongforge_llm.dsa.mla import DSAMLAttention, MLADims
from loongforge_llm.dsa.topk import select_topk, topk_to_mask

SEG = torch.tensor([[0] * 5 + [1] * 9 + [2] * 6, [0] * 12 + [1] * 8])
S = SEG.shape[1]


def test_never_selects_future_or_other_document():
    torch.manual_seed(0)
    scores = torch.randn(2, S, S)
    # adversarial: the forbidden keys score highest
    same_doc = SEG[:, :, None] == SEG[:, None, :]
    past = torch.ones(S, S, dtype=torch.bool).tril()
    scores = torch.where(same_doc & past, scores, scores + 100.0)
    for k in (1, 3, 7, S):
        idx = select_topk(scores, k, segment_ids=SEG)
        for b in range(2):
            for s in range(S):
                allowed = {t for t in range(S) if t <= s and SEG[b, t] == SEG[b, s]}
                chosen = [t for t in idx[b, s].tolist() if t >= 0]
                assert set(chosen) <= allowed and len(set(chosen)) == len(chosen) == min(k, len(allowed))
                # the chosen are the best allowed
                best = sorted(allowed, key=lambda t: -scores[b, s, t].item())[: len(chosen)]
                assert set(chosen) == set(best)
        assert topk_to_mask(idx, S).sum(-1).equal((idx >= 0).sum(-1))


def test_chunked_selection_with_segments_matches_whole():
    torch.manual_seed(1)
    q, k, w = torch.randn(2, S, 3, 8), torch.randn(2, S, 8), torch.randn(2, S, 3)
    whole = indexer_topk(q, k, w, 0.35, 4, segment_ids=SEG)
    assert torch.equal(indexer_topk(q, k, w, 0.35, 4, segment_ids=SEG, chunk_size=6), whole)


def test_bad_segment_ids_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="segment_ids must be"):
        select_topk(torch.randn(1, 4, 4), 2, segment_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="index_topk"):
        select_topk(torch.randn(1, 4, 4), 0)


@pytest.mark.parametrize("absorbed", [False, True])
def test_packed_layer_equals_each_document_alone(absorbed):
    torch.manual_seed(2)
    layer = DSAMLAttention(MLADims(32, 4, 16, 16, 8, 8, 8, 4, 16, index_topk=3))
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    x = torch.randn(2, S, 32)
    pos = torch.cat([torch.arange(n) for n in (5, 9, 6)]), torch.cat([torch.arange(n) for n in (12, 8)])
    pos = torch.stack(pos)
    with torch.no_grad():
        packed, aux = layer(x, pos, SEG, absorbed=absorbed, return_aux=True)
        for b in range(2):
            for doc in SEG[b].unique():
                sel = SEG[b] == doc
                alone = layer(x[b:b + 1, sel], absorbed=absorbed)
                torch.testing.assert_close(packed[b:b + 1, sel], alone, rtol=1e-5, atol=1e-6)
    idx = aux["topk_indices"]
    assert ((idx < 0) | (SEG.gather(1, idx.clamp(min=0).flatten(1)).view_as(idx) == SEG[:, :, None])).all()
