"""Mixture-of-experts decoders on megatron-core's ``MoELayer``: the ``model.moe`` options
(``args``), the grouped-GEMM experts (``experts``), the layer specs (``spec``), the expert weight
rules (``weights``) and the provider (``provider``). Families live in their own folders
(``qwen3_moe/``)."""
