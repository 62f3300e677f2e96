"""Turn data samples into model inputs, and the per-token loss into megatron-core's loss tuple."""

from __future__ import annotations

import torch


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [b, 1, s, s] in megatron's convention (True = masked out)."""
    s = segment_ids.shape[-1]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same_doc & causal)[:, None]


def model_inputs(batch: dict, device, document_attention: bool) -> dict:
    """Keyword arguments for the model's forward (tokens, positions, mask, labels)."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    segment_ids = batch.get("segment_ids")
    single_doc = segment_ids is None or bool((segment_ids == segment_ids[:, :1]).all())
    mask = None if (not document_attention or single_doc) else document_attention_mask(segment_ids.to(device))
    return {
        "input_ids": tokens,
        "position_ids": batch["position_ids"].to(device, non_blocking=True),
        "attention_mask": mask,
        "labels": batch["labels"].to(device, non_blocking=True),
    }


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron-core's per-token loss contract: (sum of losses, number of tokens, logged values)."""
    loss_mask = loss_mask.to(per_token_loss.device).float()
    total = (per_token_loss.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return total, tokens, {"loss_sum": total.detach().clone(), "tokens": tokens.detach().clone()}
