"""The core's LoRA (loongforge.peft.lora) applies to the Wan DiT's megatron linears."""

import torch
from loongforge.peft.lora import apply_lora, is_lora_param
from loongforge_diffusion.testing import A14B
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT


def test_lora_on_wan(megatron_cpu):
    torch.manual_seed(0)
    model = WanDiT(WanConfig.from_diffusers(dict(A14B)))
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        before = model(x, t, ctx)
    adapted = apply_lora(model, rank=4, alpha=8)
    assert sorted({n.split(".", 2)[2] for n in adapted}) == [
        "cross_attn.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2", "self_attn.linear_proj", "self_attn.linear_qkv"]
    assert len(adapted) == 2 * 5
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), before)  # B = 0: the adapted model starts as the base
    model(x, t, ctx).square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_param(n) for n in trainable)
    assert model.blocks[0].self_attn.linear_qkv.lora_B.grad.abs().sum() > 0
