"""Optimizer memory levers (config section ``precision``) on CPU: bf16 AdamW moments (state dtypes
asserted, loss finite and close to the fp32-moment run, the update equal to torch's AdamW where
the moments round exactly), and the refusals that name the key."""

from __future__ import annotations

import pytest
import torch
from loongforge.config import ConfigError
from loongforge.config.schema import RunConfig
from loongforge.testing import megatron_train_step, single_process_megatron, tiny_bf16_gpt
from loongforge.trainer.optim import LowPrecisionMomentsAdamW, build_optimizer, precision_options
from omegaconf import OmegaConf

STEPS = 12


def _cfg(**precision):
    cfg = OmegaConf.structured(RunConfig)
    cfg.train.precision = "bf16"
    cfg.optimizer.lr = 1e-2
    for key, value in precision.items():
        OmegaConf.update(cfg, key if "." in key else f"precision.{key}", value)
    return cfg


def _train(cfg):
    with single_process_megatron(seed=11) as backend:
        model, _ = tiny_bf16_gpt()
        optimizer = build_optimizer(cfg, [model], backend)
        tokens = torch.randint(0, 96, (STEPS, 2, 17), generator=torch.Generator().manual_seed(5))
        losses = []
        for step in range(STEPS):
            loss, (ok, _, _) = megatron_train_step(model, optimizer, tokens[step % 2])  # two batches, memorised
            assert ok
            losses.append(float(loss))
        torch_opt = optimizer.chained_optimizers[0].optimizer
        states = [torch_opt.state[p] for g in torch_opt.param_groups for p in g["params"]]
        masters = [p for g in torch_opt.param_groups for p in g["params"]]
        return losses, torch_opt, states, masters


def test_bf16_moments_state_dtypes_and_loss_close_to_fp32():
    ref_losses, ref_opt, ref_states, ref_masters = _train(_cfg())
    losses, opt, states, masters = _train(_cfg(exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16"))
    assert type(opt) is LowPrecisionMomentsAdamW and type(ref_opt) is not LowPrecisionMomentsAdamW
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all(s["exp_avg"].dtype == torch.float32 for s in ref_states)
    assert all(p.dtype == torch.float32 for p in masters)  # fp32 master weights kept
    # placement: state on the parameters' device (no offload)
    assert all(s["exp_avg"].device == p.device for s, p in zip(states, masters, strict=True))
    print("fp32 moments:", ref_losses, "\nbf16 moments:", losses)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1  # it trains
    assert losses == pytest.approx(ref_losses, rel=2e-2)


def test_mixed_moment_dtypes():
    _, opt, states, _ = _train(_cfg(exp_avg_sq_dtype="bf16"))
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert opt.moment_dtypes == (torch.float32, torch.bfloat16)


def test_low_precision_adamw_matches_torch_adamw_in_fp32_and_converts_state():
    """With fp32 moments the class is torch's AdamW step for step; fp32 state (a checkpoint,
    megatron's init_state_fn) becomes bf16 on the next step; chunking changes nothing."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(300, generator=g), torch.randn(7, 5, generator=g)]
    ref = [p.clone().requires_grad_() for p in params]
    ours = [p.clone().requires_grad_() for p in params]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    ref_opt, opt = torch.optim.AdamW(ref, foreach=False, **kw), torch.optim.AdamW(ours, **kw)
    assert LowPrecisionMomentsAdamW.install(opt, torch.float32, torch.float32)
    opt.CHUNK = 64  # several chunks per tensor
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for ps, o in ((ref, ref_opt), (ours, opt)):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            o.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    opt.moment_dtypes = (torch.bfloat16, torch.bfloat16)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in ours)


@pytest.mark.parametrize(("override", "key"), [
    ({"exp_avg_dtype": "fp16"}, "precision.exp_avg_dtype"),
    ({"main_params_dtype": "bf16"}, "precision.main_params_dtype"),
    ({"optimizer_cpu_offload": True}, "precision.optimizer_cpu_offload"),
    ({"exp_avg_dtype": "bf16", "train.precision": "fp32"}, "precision.exp_avg_dtype"),
])
def test_bad_precision_keys_are_refused_by_name(override, key):
    class Cpu:
        name = "cpu"

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        precision_options(_cfg(**override), Cpu())


def test_precision_aware_optimizer_needs_te_or_is_passed_on(monkeypatch):
    import importlib.util

    class Cuda:
        name = "cuda"

    cfg = _cfg(use_precision_aware_optimizer=True, exp_avg_dtype="bf16", **{"optimizer.distributed": True})
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ConfigError, match=r"precision\.use_precision_aware_optimizer.*Transformer Engine"):
            precision_options(cfg, Cuda())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "transformer_engine"
                        else real(name, *a))
    out = precision_options(cfg, Cuda())
    assert out["use_precision_aware_optimizer"] and out["exp_avg_dtype"] == torch.bfloat16
    assert out["main_params_dtype"] == torch.float32 and out["moments"] is None
    cfg.optimizer.distributed = False
    with pytest.raises(ConfigError, match=r"optimizer\.distributed"):
        precision_options(cfg, Cuda())


def test_offload_maps_to_megatron_on_cuda_with_the_distributed_optimizer():
    class Cuda:
        name = "cuda"

    out = precision_options(_cfg(optimizer_cpu_offload=True, optimizer_offload_fraction=0.5,
                                 **{"optimizer.distributed": True}), Cuda())
    assert out == {"moments": None, "optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}
    with pytest.raises(ConfigError, match=r"optimizer\.distributed"):
        precision_options(_cfg(optimizer_cpu_offload=True), Cuda())

