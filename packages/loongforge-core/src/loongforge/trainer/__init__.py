"""The trainer: a small loop on megatron-core whose features hook in through lifecycle hooks."""
