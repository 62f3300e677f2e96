"""The Wan DiT family (Wan2.1 / Wan2.2): config record, megatron-core model, diffusers weight mapping."""
