"""DeepSeek-V3: logits parity with ``transformers.DeepseekV3ForCausalLM`` (tiny config, fp32,
random weights including the routers' ``e_score_correction_bias``) and a bit-identical HF ->
ours -> HF round trip. Covers multi-latent attention with q/kv LoRA ranks and v_head_dim !=
qk head dim (our ``MLASDPAttention``), ``rope_interleave`` on and off, a dense first layer, sigmoid
group-limited routing with the bias, ``routed_scaling_factor`` and a shared expert. The MTP
module is not built (not tested)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_llm.deepseek.provider import DeepseekV3Provider

sys.path.insert(0, os.path.dirname(__file__))
from test_parity import hf_model  # noqa: E402

SEQ = 24


def provider_and_hf(load_size, seed=0, **changes):
    from omegaconf import OmegaConf

    section = OmegaConf.to_container(load_size("deepseek_v3", "deepseek_v3_tiny"))
    section.update(changes)
    provider = DeepseekV3Provider(section)
    hf = hf_model(provider, seed=seed)
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return provider, hf


def build(provider, backend, hf):
    run = RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=backend).eval()
    sd = hf.state_dict()
    provider.load_hf_weights(model, sd.__getitem__)
    return model


@pytest.mark.parametrize("interleave", [True, False], ids=["rope_interleave", "rope_plain"])
def test_logits_match_hf(mcore, load_size, interleave):
    provider, hf = provider_and_hf(load_size, rope_interleave=interleave)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ours = build(provider, mcore, hf)
    assert type(ours.decoder.layers[1].self_attention.core_attention).__name__ == "MLASDPAttention"
    vocab = provider.args.vocab_size
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, ref = ours(ids, torch.arange(SEQ).expand(2, SEQ), None), hf(ids).logits
    rel = ((logits[..., :vocab] - ref).norm() / ref.norm()).item()
    print(f"\ndeepseek_v3 (rope_interleave={interleave}): |ours - hf| / |hf| = {rel:.2e}")
    assert rel < 1e-5


@pytest.mark.parametrize("interleave", [True, False])
def test_round_trip_bit_identical(mcore, load_size, tmp_path, interleave):
    from loongforge.weight_mapping import safetensors_getter
    from safetensors import safe_open

    provider, hf = provider_and_hf(load_size, seed=4, rope_interleave=interleave)
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    run = RunSettings()
    ours = provider.build(provider.transformer_config(run), run, backend=mcore)
    provider.load_hf_weights(ours, safetensors_getter(tmp_path))
    back = provider.export_hf_weights(ours)
    assert sorted(back) == sorted(saved)
    for k, t in saved.items():
        assert torch.equal(back[k], t), k


def test_correction_bias_moves_by_the_update_rate(mcore, load_size):
    """After a training step megatron-core's ``finalize_model_grads`` moves each router's bias by
    ``model.moe.bias_update_rate`` towards balance: +rate for experts below the mean load, -rate
    above it (the auxiliary-loss-free balancing of DeepSeek-V3)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from omegaconf import OmegaConf

    section = OmegaConf.to_container(load_size("deepseek_v3", "deepseek_v3_tiny"))
    section["moe"] = {"bias_update_rate": 0.01}
    provider = DeepseekV3Provider(section)
    run = RunSettings()
    config = provider.transformer_config(run)
    assert config.moe_router_bias_update_rate == 0.01
    model = provider.build(config, run, backend=mcore).train()
    routers = [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    loads = {id(r): torch.zeros(config.num_moe_experts) for r in routers}
    def count(router, inputs, outputs) -> None:  # the expert loads this step (after routing)
        loads[id(router)] += outputs[1].sum(0).float()

    for r in routers:
        r.register_forward_hook(count)
    before = [r.expert_bias.clone() for r in routers]
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    ids = torch.randint(0, provider.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ddp(ids, torch.arange(16).expand(2, 16), None, labels=ids).sum().backward()
    finalize_model_grads([ddp])
    for r, old in zip(routers, before, strict=True):
        load = loads[id(r)]
        expected = old + 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(r.expert_bias, expected)
        assert not torch.equal(r.expert_bias, old)
