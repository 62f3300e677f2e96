"""An example third-party model plugin: a tiny GPT built directly on megatron-core."""
