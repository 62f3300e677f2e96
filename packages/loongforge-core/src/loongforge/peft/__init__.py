"""Parameter-efficient fine-tuning: LoRA on megatron-core linears (:mod:`.lora`) and PEFT-format
export (:mod:`.export`)."""
