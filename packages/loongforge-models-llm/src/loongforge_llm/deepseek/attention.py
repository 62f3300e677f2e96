"""Core attention for multi-latent attention: queries/keys of one head size, values of another.

megatron-core's ``MLASelfAttention`` builds its core attention with ``k_channels`` (nope + rope
head dims) and ``v_channels`` (``v_head_dim``); torch SDPA takes q/k and v of different head
sizes as they are, so :class:`~loongforge.modules.attention.SDPAttention` serves once it accepts
those arguments (and uses MLA's ``softmax_scale``)."""

from __future__ import annotations

import math

from loongforge.modules.attention import SDPAttention


class MLASDPAttention(SDPAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
        if softmax_scale is None and k_channels:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection)
        self.k_channels, self.v_channels = k_channels, v_channels
