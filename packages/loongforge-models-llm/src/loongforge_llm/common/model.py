"""GPTModel whose rotary embedding follows ``position_ids`` and whose loss ignores padded vocab rows.

megatron-core's GPTModel computes RoPE for positions 0..S-1 and ignores ``position_ids`` (they
only feed learned absolute embeddings). Packed pre-training and SFT samples restart positions at
every document, as HF models do when given ``position_ids``; this subclass computes the rotary
angles from the ids whenever they are not the plain ``arange``.

The embedding and output layer are padded past the tokenizer's vocabulary (to a multiple of
``make_vocab_size_divisible_by x tp``). megatron-core's cross-entropy normalises over every row,
so the padding would enter the softmax (exp(0) per zero row) and the loss would depend on the TP
size and differ from HF's; ``real_vocab_size`` masks those columns out of the loss.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.gpt import GPTModel


class PositionIdsGPTModel(GPTModel):
    #: ``GPTModel.forward``'s ``output_processor`` for training calls (labels given) that pass
    #: none, e.g. a backend's fused LM-head cross-entropy; ``None``: megatron-core's own path
    output_processor = None
    #: the tokenizer's vocabulary size; output columns past it are padding (``None``: no padding)
    real_vocab_size: int | None = None

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
        if self.output_processor is not None and labels is not None and kwargs.get("output_processor") is None:
            kwargs["output_processor"] = functools.partial(self.output_processor, vocab_size=self.real_vocab_size)
        return super().forward(*args, **kwargs)

    def compute_language_model_loss(self, labels, logits):
        return super().compute_language_model_loss(labels, self._mask_padded_vocab(logits))

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [s, b, this TP rank's vocab slice] with the padded columns at -inf."""
        if self.real_vocab_size is None:
            return logits
        local = logits.shape[-1]
        real_here = self.real_vocab_size - self.tp_group.rank() * local
        if real_here >= local:
            return logits
        padded = torch.arange(local, device=logits.device) >= max(real_here, 0)
        return logits.masked_fill(padded, float("-inf"))

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None or out[1] is None:
            return out
        seq = position_ids.shape[-1]
        # under context parallelism megatron-core's angles are those of this rank's zigzag chunks
        # (loongforge.modules.attention), not of 0..s-1: a rank's ids that happen to read 0..s-1
        # must still go through the ids
        plain = self.config.context_parallel_size == 1 and torch.equal(
            position_ids, torch.arange(seq, device=position_ids.device).expand_as(position_ids))
        if plain:
            return out
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)
        freqs = position_ids.t().to(inv_freq.dtype)[..., None] * inv_freq  # [s, b, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [s, b, 1, d]: broadcasts over heads
        return (out[0], emb, *out[2:])
