"""megatron-core's optimizer (plain or distributed) and its LR/WD scheduler from the config."""

from __future__ import annotations

import warnings

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from loongforge.config import ConfigError
from loongforge.trainer.multi_tensor import fold_clipping_into

_DECAY_STYLES = {"constant": "constant", "cosine": "cosine", "wsd": "WSD", "linear": "linear"}


def build_optimizer(cfg, ddp_chunks, backend):
    o = cfg.optimizer
    if o.distributed and not backend.supports_distributed_optimizer:
        raise ConfigError(f"config key 'optimizer.distributed': backend {backend.name!r} has no distributed optimizer")
    bf16 = cfg.train.precision == "bf16"
    return use_fused_adam(get_megatron_optimizer(OptimizerConfig(
        optimizer=o.name, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=cfg.train.grad_clip,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed,
    ), ddp_chunks))


def use_fused_adam(optimizer):
    """Switch megatron-core's torch Adam/AdamW (its choice without TE or apex, built with torch's
    default multi-tensor path) to torch's fused kernel: one pass over parameters, gradients and
    both moments instead of a dozen ``_foreach`` passes. Only where torch has the fused kernel
    for every parameter's device; an optimizer fused throughout also takes gradient clipping
    into that kernel (``multi_tensor.fold_clipping_into``)."""
    fused_devices = set(torch.utils._foreach_utils._get_fused_kernels_supported_devices())
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            if all(p.device.type in fused_devices and p.dtype.is_floating_point for p in group["params"]):
                group["fused"], group["foreach"] = True, False
        if all(group.get("fused") for group in torch_opt.param_groups):
            fold_clipping_into(torch_opt)
    return optimizer


def build_scheduler(cfg, optimizer) -> OptimizerParamScheduler:
    s, o, steps = cfg.scheduler, cfg.optimizer, cfg.train.steps
    if s.type not in _DECAY_STYLES:
        raise ConfigError(f"config key 'scheduler.type': {s.type!r} is not one of {', '.join(_DECAY_STYLES)}")
    decay_steps = s.decay_steps or steps
    warmup = s.warmup_steps
    if warmup >= decay_steps:
        # a shortened run (train.steps=3 on a config with 20 warm-up steps) should still run
        warmup = max(decay_steps - 1, 0)
        warnings.warn(f"scheduler.warmup_steps={s.warmup_steps} >= decay steps {decay_steps}: using {warmup}",
                      stacklevel=2)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay_steps, lr_decay_style=_DECAY_STYLES[s.type],
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant",
        wsd_decay_steps=int(decay_steps * s.wsd_decay_fraction) if s.type == "wsd" else None,
        lr_wsd_decay_style="cosine" if s.type == "wsd" else None,
    )
