"""DeepSeek-V3 MoE routing on megatron-core's router (``deepseek.routing``). The full
``DeepseekV3ForCausalLM`` family (multi-latent attention, MTP) is not built yet."""
