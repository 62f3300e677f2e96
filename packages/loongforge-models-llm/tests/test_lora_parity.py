"""LoRA on megatron-core linears vs. HF + PEFT: the exported adapter (fused q/k/v and gate/up B
matrices split, A copied per part) loaded with ``peft.PeftModel.from_pretrained`` gives our logits;
merged export gives the same; TP=2 adapters (with and without sequence parallelism) give the TP=1
logits and gradients (two gloo processes), and their distributed checkpoint loads at TP=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge.peft.export import save_adapter, save_merged
from loongforge.peft.lora import apply_lora, lora_modules
from loongforge_llm.provider import LLMProvider


def hf_model(provider: LLMProvider, seed: int = 0):
    """The HF model of ``provider``'s config, random weights (norms around 1), fp32, eager attention."""
    import transformers

    cfg = dict(provider.hf_config())
    hf_cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.05 * torch.randn_like(p))
    return model.eval()


def ours_from_hf(provider: LLMProvider, hf, backend, run: RunSettings | None = None):
    run = run or RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=backend).eval()
    provider.load_hf_weights(model, hf.state_dict().__getitem__)
    return model


REL_TOL = 1e-5
RANK, ALPHA = 4, 8.0


def randomize_b(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("group,name", [("qwen3", "qwen3_tiny"), ("qwen2", "qwen2_tiny"), ("llama2", "llama2_tiny")])
def test_peft_adapter_matches_ours(mcore, load_size, tmp_path, group, name):
    import peft

    provider = LLMProvider(load_size(group, name))
    hf = hf_model(provider)
    ours = ours_from_hf(provider, hf, mcore)
    adapted = apply_lora(ours, RANK, ALPHA, 0.0, ["qkv", "proj", "fc1", "fc2"], seed=1)
    assert len(adapted) == 4 * provider.args.num_hidden_layers
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    vocab = provider.args.vocab_size
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        base_logits = ours(ids, pos, None)[..., :vocab].clone()
    randomize_b(ours)
    with torch.no_grad():
        logits = ours(ids, pos, None)[..., :vocab]
    assert rel(logits, base_logits) > 1e-3  # the adapters do something

    # sharded checkpoint state holds the adapters (B sharded like the weight, A replicated at tp=1)
    sharded = ours.sharded_state_dict()
    assert any(k.endswith("linear_qkv.lora_B") for k in sharded) and any(k.endswith("linear_fc2.lora_A") for k in sharded)

    mapping = provider.weight_mapping().matching([n for n, _ in ours.named_parameters()])
    save_adapter(ours, mapping, tmp_path / "adapter", rank=RANK, alpha=ALPHA)
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        ref_base = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    err = rel(logits, ref)
    print(f"\n{name}: LoRA logits |ours - peft| / |peft| = {err:.2e} (adapter effect {rel(ref, ref_base):.2e})")
    assert err < REL_TOL

    # merged HF weights: the plain HF model loaded from them gives the same logits
    import transformers

    save_merged(ours, provider, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        err_merged = rel(merged(input_ids=ids).logits, ref)
    print(f"{name}: merged export |merged - peft| / |peft| = {err_merged:.2e}")
    assert err_merged < REL_TOL


# --- TP=2 vs TP=1 -----------------------------------------------------------------------------------

#: vocab 256 pads to the same size at TP=1 and TP=2, so the losses (softmax over the padded vocab) agree
CONFIG = dict(family="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=128, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, initializer_range=0.02)


def batch(provider):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, provider.args.vocab_size, (2, 24), generator=g)
    labels = torch.randint(0, provider.args.vocab_size, (2, 24), generator=g)
    return ids, torch.arange(24).expand(2, 24), labels


def full_b(name, shape, seed=11):
    """A seeded full (TP=1) B matrix for module ``name``; TP workers shard it."""
    import zlib

    g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return 0.05 * torch.randn(shape, generator=g)


def set_lora_b(model, provider, run: RunSettings, tp_rank: int = 0):
    """B of every adapted linear from :func:`full_b`, sharded like its weight (column-parallel)."""
    mapping = provider.weight_mapping(run)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            b = full_b(name, (m.lora_B.shape[0] * (run.tp if m.lora_column else 1), m.lora_B.shape[1]))
            m.lora_B.copy_(mapping.shard(f"{name}.weight", b, tp_rank, run.tp) if m.lora_column else b)


def test_tp2_matches_tp1(mcore, tmp_path):
    """LoRA at TP=2 (two gloo processes, without and with sequence parallelism): logits, loss and
    every adapter gradient equal TP=1's. The workers load the same HF weights from safetensors."""
    from loongforge.testing import free_port
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    provider = LLMProvider(OmegaConf.create(CONFIG))
    hf = hf_model(provider)
    weights = tmp_path / "hf.safetensors"
    save_file({k: v.clone().contiguous() for k, v in hf.state_dict().items()}, str(weights))
    worker = Path(__file__).with_name("lora_tp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(worker.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(free_port()), str(worker), str(weights), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    # TP=1 reference, while the workers run
    model = ours_from_hf(provider, hf, mcore)
    model.train()
    apply_lora(model, RANK, ALPHA, 0.0, ["qkv", "proj", "fc1", "fc2"], seed=1)
    set_lora_b(model, provider, RunSettings())
    ids, pos, labels = batch(provider)
    with torch.no_grad():
        logits = model(ids, pos, None)
    loss = model(ids, pos, None, labels=labels).sum()
    loss.backward()

    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    for sp in (False, True):
        tp2 = load_file(str(tmp_path / f"tp2_sp{int(sp)}.safetensors"))
        err = rel(tp2["logits"], logits)
        print(f"\nTP=2 (sequence_parallel={sp}) vs TP=1: logits rel err {err:.2e}, "
              f"loss {tp2['loss'].item():.6f} vs {loss.item():.6f}")
        assert err < REL_TOL and tp2["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        worst = max(rel(tp2[f"{name}.{part}"], getattr(m, part).grad)
                    for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B"))
        print(f"TP=2 (sequence_parallel={sp}): worst adapter gradient rel err {worst:.2e} "
              f"over {2 * len(lora_modules(model))} tensors")
        assert worst < REL_TOL

    # the TP=2 checkpoint (B of fused fc1 sharded as [gate_r; up_r] per rank) loads at TP=1 unchanged
    from megatron.core import dist_checkpointing

    fresh = ours_from_hf(provider, hf, mcore)
    apply_lora(fresh, RANK, ALPHA, 0.0, ["qkv", "proj", "fc1", "fc2"], seed=1)
    with torch.no_grad():
        for m in lora_modules(fresh).values():
            m.lora_A.zero_()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "ckpt_tp2")))
    for name, m in lora_modules(fresh).items():
        ref = lora_modules(model)[name]
        assert torch.equal(m.lora_A, ref.lora_A) and torch.equal(m.lora_B, ref.lora_B), name
    print(f"TP=2 checkpoint -> TP=1: all {len(lora_modules(fresh))} adapters identical")
