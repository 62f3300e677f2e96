"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, with context parallelism.

megatron-core's local ``DotProductAttention`` materialises the [b, h, s, s] score matrix (it ran
out of memory on an 80 GB H100 at 1B parameters, seq 4096), allocates on ``"cuda"`` and asserts
``context_parallel_size == 1`` (CP normally comes from Transformer Engine); SDPA picks a fused
kernel on every device and takes grouped KV heads directly.

Context parallelism (``context_parallel_size = cp > 1``)
--------------------------------------------------------
Token layout: megatron's load-balanced one (``megatron.core.utils.get_batch_on_this_cp_rank``
and the CP slicing of ``RotaryEmbedding``). A sequence of S tokens is cut into ``2 * cp`` chunks
of ``c = S / (2 cp)``; CP rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``, in that order, so
every rank has the same causal-attention work. ``loongforge.trainer.batches.split_for_context_parallel``
cuts the batch that way.

Communication: keys and values are all-gathered over the CP group (megatron-core's
``gather_from_sequence_parallel_region``, whose backward is a reduce-scatter: the gradient of a
rank's keys is the sum of what every rank's queries sent back) and put back into sequence
order; each rank then attends with its own queries only. This is the "all-gather" CP variant
(Transformer Engine's ``cp_comm_type="all_gather"``); ``cp_comm_type`` itself is ignored.

Masks:

* no ``attention_mask`` with a causal mask type: each local chunk attends causally to the keys
  up to its own end (chunk ``j``: ``(j + 1) c`` keys, causal mask aligned to the bottom right);
* an ``attention_mask`` (document masks of packed sequences) must be this rank's query rows
  against *all* keys in sequence order, ``[b, 1, S / cp, S]`` (True = masked, megatron's
  convention); ``split_for_context_parallel`` + ``model_inputs`` build exactly that, so packed
  documents keep their block-diagonal causal attention under CP. A mask shaped for the local
  keys only (``[..., S / cp, S / cp]``) is refused with a message.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def zigzag_positions(cp_rank: int, cp_size: int, seq_length: int, device=None) -> torch.Tensor:
    """Global positions of CP rank ``cp_rank``'s tokens, in its local order (chunks r, 2cp-1-r)."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x cp = {2 * cp_size}")
    c = seq_length // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * c, (first + 1) * c, device=device),
                      torch.arange(second * c, (second + 1) * c, device=device)])


def gathered_to_sequence_order(cp_size: int, local_length: int, device=None) -> torch.Tensor:
    """Index that puts the rank-ordered concatenation of every CP rank's tokens in sequence order."""
    seq_length = cp_size * local_length
    where = torch.empty(seq_length, dtype=torch.long, device=device)
    for rank in range(cp_size):
        where[zigzag_positions(rank, cp_size, seq_length, device)] = torch.arange(
            rank * local_length, (rank + 1) * local_length, device=device)
    return where


def _lower_right_causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean "may attend" mask [q_len, kv_len]: query i is key position kv_len - q_len + i."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


class SDPAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's ``SelfAttention`` (query/key/value [s, b, h, d]).

    ``attention_mask``: megatron's convention, bool, True where attention is *not* allowed,
    broadcastable to [b, h, s, s] (under CP: [b, h, s/cp, s], see the module docstring);
    ``None`` with a causal mask type means plain causal attention.
    """

    #: SDPA kernels to allow, in torch's ``SDPBackend`` names; ``None`` lets torch choose. A
    #: backend sets this per shape from measurement (see ``loongforge_cuda``).
    sdpa_backends: list | None = None

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = None
        self._orders: dict = {}  # (local length, device) -> gathered_to_sequence_order
        if config.context_parallel_size > 1:
            cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
            if cp_group is None:
                from megatron.core import parallel_state

                cp_group = parallel_state.get_context_parallel_group()
            self.cp_group = cp_group

    def _sdpa(self, q, k, v, allowed, causal):
        ctx = nullcontext() if self.sdpa_backends is None else torch.nn.attention.sdpa_kernel(self.sdpa_backends)
        with ctx:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=causal, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes packed documents as an attention_mask")
        mask_type = attn_mask_type or self.attn_mask_type
        s, b = query.shape[0], query.shape[1]
        if self.cp_group is not None and self.cp_group.size() > 1:
            out = self._context_parallel(query, key, value, attention_mask, mask_type)
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
            causal = attention_mask is None and mask_type == AttnMaskType.causal
            out = self._sdpa(q, k, v, None if attention_mask is None else ~attention_mask, causal)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, h*d]

    def _context_parallel(self, query, key, value, attention_mask, mask_type) -> torch.Tensor:
        """This rank's queries against every rank's keys/values; returns [b, h, s_local, d]."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        cp, rank = self.cp_group.size(), self.cp_group.rank()
        local = query.shape[0]
        seq = local * cp
        order = self._orders.get((local, query.device))
        if order is None:
            order = self._orders[(local, query.device)] = gathered_to_sequence_order(cp, local, query.device)
        # [s, b, hk, d] -> all ranks' tokens (rank order) -> sequence order; backward: reduce-scatter
        key, value = (gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True,
                                                           group=self.cp_group).index_select(0, order)
                      for t in (key, value))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if attention_mask is not None:
            if attention_mask.shape[-1] != seq or attention_mask.shape[-2] not in (1, local):
                raise ValueError(
                    f"with context parallelism (cp={cp}) the attention mask must be this rank's "
                    f"{local} query rows against all {seq} keys ([b, 1, {local}, {seq}], built by "
                    f"loongforge.trainer.batches.model_inputs after split_for_context_parallel); "
                    f"got shape {tuple(attention_mask.shape)}")
            return self._sdpa(q, k, v, ~attention_mask, False)
        if mask_type != AttnMaskType.causal:
            return self._sdpa(q, k, v, None, False)
        c = local // 2
        outs = []
        for half, chunk in enumerate((rank, 2 * cp - 1 - rank)):
            kv_len = (chunk + 1) * c
            qh = q[:, :, half * c:(half + 1) * c]
            kh, vh = k[:, :, :kv_len], v[:, :, :kv_len]
            if kv_len == c:
                outs.append(self._sdpa(qh, kh, vh, None, True))
            else:
                outs.append(self._sdpa(qh, kh, vh, _lower_right_causal(c, kv_len, q.device), False))
        return torch.cat(outs, dim=2)
