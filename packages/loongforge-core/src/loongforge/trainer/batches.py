"""Turn data samples into model inputs, and the per-token loss into megatron-core's loss tuple.

Context parallelism: :func:`split_for_context_parallel` keeps this CP rank's tokens of every
sequence tensor in megatron's load-balanced layout (chunks ``r`` and ``2 cp - 1 - r`` of ``2 cp``,
see ``loongforge.modules.attention``), and the full ``segment_ids`` under ``kv_segment_ids`` so
that :func:`model_inputs` can build the document mask of the local queries against all keys.
"""

from __future__ import annotations

import torch

#: the per-token tensors of a sample ([b, s]), cut along the sequence under context parallelism
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def document_attention_mask(segment_ids: torch.Tensor, query_positions: torch.Tensor | None = None,
                            key_segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal causal mask in megatron's convention (True = masked out).

    Without the optional arguments: [b, 1, s, s] for ``segment_ids`` [b, s]. Under context
    parallelism: ``segment_ids`` [b, s_local] of the local queries, ``query_positions`` [s_local]
    their positions in the sequence, ``key_segment_ids`` [b, s] the whole sequence's; the mask is
    [b, 1, s_local, s] (local queries x all keys in sequence order).
    """
    if query_positions is None:
        s = segment_ids.shape[-1]
        same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
        causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
        return ~(same_doc & causal)[:, None]
    s = key_segment_ids.shape[-1]
    same_doc = segment_ids[:, :, None] == key_segment_ids[:, None, :]
    causal = torch.arange(s, device=segment_ids.device)[None, :] <= query_positions[:, None]
    return ~(same_doc & causal)[:, None]


def split_for_context_parallel(batch: dict, cp_rank: int | None = None, cp_size: int | None = None) -> dict:
    """This context-parallel rank's part of a micro-batch (the batch itself when cp = 1).

    Sequence tensors (:data:`SEQUENCE_KEYS`) keep the tokens at
    ``zigzag_positions(cp_rank, cp_size, s)``; ``kv_segment_ids`` (the whole ``segment_ids``) and
    ``cp_positions`` (the kept positions) are added for the attention mask. Ranks default to
    megatron-core's parallel state.
    """
    if cp_size is None:
        from megatron.core import parallel_state

        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
    if cp_size == 1:
        return batch
    from loongforge.modules.attention import zigzag_positions

    seq = batch["tokens"].shape[-1]
    keep = zigzag_positions(cp_rank, cp_size, seq)
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if batch.get(key) is not None:
            out[key] = batch[key].index_select(-1, keep.to(batch[key].device))
    if batch.get("segment_ids") is not None:
        out["kv_segment_ids"] = batch["segment_ids"]
    out["cp_positions"] = keep
    return out


def model_inputs(batch: dict, device, document_attention: bool) -> dict:
    """Keyword arguments for the model's forward (tokens, positions, mask, labels).

    A batch from :func:`split_for_context_parallel` gets the [b, 1, s_local, s] mask of its
    queries against the whole sequence; ``None`` (plain causal) when the sample is one document.
    Under context parallelism an uncut batch is refused: the attention would silently mix every
    rank's whole sequence.
    """
    if "cp_positions" not in batch:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
            from loongforge.config import ConfigError

            raise ConfigError(
                f"config key 'parallel.cp' = {parallel_state.get_context_parallel_world_size()}: this task's "
                f"forward step passes whole sequences; cut each micro-batch with "
                f"loongforge.trainer.batches.split_for_context_parallel first (as the pretrain task does)")
    tokens = batch["tokens"].to(device, non_blocking=True)
    all_segments = batch.get("kv_segment_ids", batch.get("segment_ids"))
    single_doc = all_segments is None or bool((all_segments == all_segments[:, :1]).all())
    if not document_attention or single_doc:
        mask = None
    elif "cp_positions" in batch:
        mask = document_attention_mask(batch["segment_ids"].to(device), batch["cp_positions"].to(device),
                                       all_segments.to(device))
    else:
        mask = document_attention_mask(all_segments.to(device))
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
