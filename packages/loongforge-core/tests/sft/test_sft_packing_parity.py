"""A packed SFT batch (several conversations per row, block-diagonal attention, positions restarting
per conversation) gives the same summed loss and the same gradients as the same conversations one
per row (fp32, CPU), through the trainer's own batch -> model-input path."""

from __future__ import annotations

import pytest
import torch
from loongforge.data.packing import collate
from loongforge.data.sft import ChatEncoder, SFTDataset, read_conversations
from loongforge.data.tokenizer import load_tokenizer
from loongforge.testing import single_process_megatron
from loongforge.trainer.batches import masked_token_loss, model_inputs

llm = pytest.importorskip("loongforge_llm.provider")

MODEL = dict(family="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=1024, max_position_embeddings=256, rope_theta=10000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, initializer_range=0.02)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    per_token = model(**model_inputs(batch, torch.device("cpu"), document_attention=True))
    total, tokens, _ = masked_token_loss(batch["loss_mask"], per_token)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.item(), int(tokens), grads


@pytest.mark.parametrize("lora", [False, True])
def test_packed_equals_unpacked(lora):
    from loongforge.model_provider import RunSettings

    tok = load_tokenizer("builtin:tiny_stories")
    enc = ChatEncoder(tok, "chatml")
    convs, _ = read_conversations(["builtin:tiny_chat"])
    encoded = [enc.encode(m) for m in convs[:10]]
    S = 256
    packed = SFTDataset(encoded, S, tok.pad_token_id, pack=True, seed=0)
    single = SFTDataset(encoded, S, tok.pad_token_id, pack=False)
    assert len(packed) < len(single) == 10
    with single_process_megatron(seed=3) as backend:
        provider = llm.LLMProvider(MODEL)
        run = RunSettings(seq_length=S)
        model = provider.build(provider.transformer_config(run), run, backend=backend)
        if lora:
            from loongforge.peft.lora import apply_lora, lora_modules

            apply_lora(model, 4, 8.0, 0.0, ["qkv", "proj", "fc1", "fc2"], seed=0)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for m in lora_modules(model).values():
                    m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
        a = loss_and_grads(model, collate([packed[i] for i in range(len(packed))]))
        b = loss_and_grads(model, collate([single[i] for i in range(len(single))]))
    print(f"\nlora={lora}: packed {len(packed)} rows loss sum {a[0]:.6f} over {a[1]} tokens; "
          f"unpacked {len(single)} rows {b[0]:.6f} over {b[1]}")
    assert a[1] == b[1]
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    worst = max(((a[2][n] - b[2][n]).norm() / b[2][n].norm().clamp_min(1e-12)).item() for n in a[2])
    print(f"max relative gradient difference {worst:.2e} over {len(a[2])} parameters")
    assert worst < 1e-5
