"""Indexer training losses of DeepSeek-V3.2 (DSA paper, "continued pre-training" section).

Target: for query ``t`` the main attention probabilities summed over heads and L1-normalised,
``p[t, :] = normalize_1(sum_h softmax_h[t, :])`` -- a fixed target (no gradient).

- ``dense_warmup``: dense attention; every parameter but the indexer's frozen;
  ``L = KL(p[t, :] || softmax(I[t, :]))`` over the query's allowed (causal, same-document) keys.
- ``sparse``: attention over the indexer's top-k set ``S_t``; the indexer's inputs are detached
  (the indexer learns only from ``L``, the model only from the LM loss);
  ``L = KL(p[t, S_t] || softmax(I[t, S_t]))``.

In both stages the loss is averaged over queries (the paper writes a sum over ``t``; a mean keeps
``loss_weight`` independent of the sequence length) and multiplied by ``loss_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loongforge.config import ConfigError
from torch import nn

from .indexer import lightning_indexer_scores_at
from .sparse_attention import sparse_attention_probs
from .topk import allowed_mask

STAGES = ("dense_warmup", "sparse")


@dataclass
class DSAIndexerConfig:
    """``stage``: ``dense_warmup`` or ``sparse``; ``index_topk``: keys per query in the sparse
    stage; ``loss_weight``: the indexer loss's own scale."""

    stage: str = "sparse"
    index_topk: int = 2048
    loss_weight: float = 1.0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"dsa.stage={self.stage!r}: expected one of {STAGES}")
        if not isinstance(self.index_topk, int) or self.index_topk <= 0:
            raise ConfigError(f"dsa.index_topk={self.index_topk!r}: expected a positive int")
        if not self.loss_weight >= 0:
            raise ConfigError(f"dsa.loss_weight={self.loss_weight!r}: expected a number >= 0")

    @property
    def detach_indexer_input(self) -> bool:
        return self.stage == "sparse"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_t p log(p / q)`` over the last dim; ``0 log 0 = 0`` (masked slots carry ``p = 0``)."""
    return (torch.xlogy(p, p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))).sum(-1)


@torch.no_grad()
def dense_attention_target(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    """``[B, S, T]``: head-summed, L1-normalised dense attention (q ``[B,S,H,D]``, k ``[B,T,Hk,D]``)."""
    q, k = q.to(_acc(q.dtype)), k.to(_acc(q.dtype))
    if k.shape[2] == 1:
        logits = torch.einsum("bshd,btd->bsht", q, k[:, :, 0])
    else:
        logits = torch.einsum("bshd,bthd->bsht", q, k)
    probs = torch.softmax((logits * scale).masked_fill(~allowed[:, :, None, :], float("-inf")), dim=-1)
    p = probs.sum(2)
    return p / p.sum(-1, keepdim=True)


@torch.no_grad()
def sparse_attention_target(q: torch.Tensor, k: torch.Tensor, scale: float, topk_indices: torch.Tensor) -> torch.Tensor:
    """``[B, S, K]``: head-summed, L1-normalised attention over the selected keys (0 at ``-1`` slots)."""
    p = sparse_attention_probs(q, k, topk_indices, scale).sum(2)
    return p / p.sum(-1, keepdim=True)


def dense_indexer_loss(index_scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ``KL(target || softmax(index_scores))`` over the allowed keys."""
    log_q = torch.log_softmax(index_scores.to(_acc(index_scores.dtype)).masked_fill(~allowed, float("-inf")), dim=-1)
    return _kl(target, log_q).mean()


def sparse_indexer_loss(index_scores: torch.Tensor, target: torch.Tensor, topk_indices: torch.Tensor,
                        gathered: bool = False) -> torch.Tensor:
    """Mean over queries of ``KL(target || softmax(index_scores[S_t]))`` over the selected keys.

    ``index_scores`` ``[B, S, T]``, or ``[B, S, K]`` already at the selected keys with
    ``gathered=True`` (``lightning_indexer_scores_at``); ``target`` and ``topk_indices`` ``[B, S, K]``.
    """
    valid = topk_indices >= 0
    picked = index_scores.to(_acc(index_scores.dtype))
    if not gathered:
        picked = picked.gather(-1, topk_indices.clamp(min=0))
    log_q = torch.log_softmax(picked.masked_fill(~valid, float("-inf")), dim=-1)
    return _kl(target, log_q).mean()


def indexer_loss(cfg: DSAIndexerConfig, aux: dict, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scaled indexer loss from a ``DSAMLAttention(..., return_aux=True)`` aux dict.

    The sparse stage scores only the selected keys (``aux["indexer"]``: the indexer's q, k, weights,
    scale), so it also works for a layer run with ``chunk_size``; the dense warm-up needs the
    whole ``[B, S, T]`` index scores.
    """
    scores, q, k = aux["index_scores"], aux["query"].detach(), aux["key"].detach()
    if cfg.stage == "sparse":
        idx = aux["topk_indices"]
        at = lightning_indexer_scores_at(*aux["indexer"], idx)
        loss = sparse_indexer_loss(at, sparse_attention_target(q, k, aux["scale"], idx), idx, gathered=True)
        return cfg.loss_weight * loss
    if scores is None:
        raise ValueError("the dense warm-up indexer loss needs the index scores: run the layer without chunk_size")
    allowed = allowed_mask(scores.shape[1], scores.shape[2], segment_ids=segment_ids, device=scores.device)
    allowed = allowed.expand_as(scores)
    loss = dense_indexer_loss(scores, dense_attention_target(q, k, aux["scale"], allowed), allowed)
    return cfg.loss_weight * loss


def freeze_for_stage(module: nn.Module, cfg: DSAIndexerConfig, indexer_prefix: str = "indexer") -> None:
    """Dense warm-up trains only the indexer (parameters whose name has an ``indexer_prefix`` part);
    the sparse stage trains everything."""
    for name, p in module.named_parameters():
        p.requires_grad_(cfg.stage == "sparse" or indexer_prefix in name.split("."))
