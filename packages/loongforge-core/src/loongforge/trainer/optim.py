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
    ), ddp_chunks), adamw_step=backend.kernel("adamw_step"))


def use_fused_adam(optimizer, adamw_step=None):
    """Switch megatron-core's torch Adam/AdamW (its choice without TE or apex, built with torch's
    default multi-tensor path) to a fused step: the backend's ``adamw_step`` kernel where given
    and applicable (:class:`KernelAdamW`), else torch's fused kernel, one pass over parameters,
    gradients and both moments instead of a dozen ``_foreach`` passes (only where torch has it
    for every parameter's device). An optimizer fused throughout also takes gradient clipping
    into that kernel (``multi_tensor.fold_clipping_into``)."""
    fused_devices = set(torch.utils._foreach_utils._get_fused_kernels_supported_devices())
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        if adamw_step is not None and KernelAdamW.install(inner, adamw_step):
            fold_clipping_into(torch_opt)
            continue
        _fuse_groups(torch_opt, fused_devices)
        # a checkpoint's param groups carry their own "fused" flags: set ours again after loading one
        torch_opt.register_load_state_dict_post_hook(lambda opt: _fuse_groups(opt, fused_devices))
        if all(group.get("fused") for group in torch_opt.param_groups):
            fold_clipping_into(torch_opt)
    return optimizer


def _fuse_groups(torch_opt, fused_devices) -> None:
    for group in torch_opt.param_groups:
        if all(p.device.type in fused_devices and p.dtype.is_floating_point for p in group["params"]):
            group["fused"], group["foreach"] = True, False


class KernelAdamW(torch.optim.AdamW):
    """torch's AdamW (same hyper-parameters, state and state dict) whose step is one multi-tensor
    kernel call per group, ``adamw_step(params, grads, exp_avgs, exp_avg_sqs, model_params, ...)``,
    that also writes each fp32 master's low-precision model parameter: megatron's separate
    master -> model copy is then skipped. Reads the clipping factor as ``grad_scale``."""

    adamw_step = None
    #: fp32 master param -> the model param the kernel refreshes (absent: none, e.g. fp32 training)
    model_params: dict = {}
    #: every step reads ``grad_scale`` (``multi_tensor.fold_clipping_into``)
    reads_grad_scale = True

    @classmethod
    def install(cls, megatron_optimizer, adamw_step) -> bool:
        """Make ``megatron_optimizer``'s torch AdamW a :class:`KernelAdamW` (decoupled weight decay,
        no amsgrad/maximize/capturable/differentiable; megatron's plain mixed-precision or fp32
        optimizer, not the distributed one). Returns whether it did."""
        from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

        torch_opt = megatron_optimizer.optimizer
        if (type(torch_opt) is not torch.optim.AdamW
                or type(megatron_optimizer) not in (Float16OptimizerWithFloat16Params, FP32Optimizer)
                or any(g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"]
                       for g in torch_opt.param_groups)):
            return False
        models = {}
        if isinstance(megatron_optimizer, Float16OptimizerWithFloat16Params):
            for model_group, main_group in zip(megatron_optimizer.float16_groups,
                                               megatron_optimizer.fp32_from_float16_groups, strict=True):
                models.update(zip(main_group, model_group, strict=True))
            # the kernel already wrote every model param it stepped
            megatron_optimizer._copy_main_params_to_model_params = lambda: None
        torch_opt.__class__ = cls
        torch_opt.adamw_step, torch_opt.model_params = adamw_step, models
        torch_opt._patch_step_function()  # torch's step hooks wrap this class's step too
        return True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # dropped after the step (fold_clipping_into's hook)
        for group in self.param_groups:
            by_step: dict[int, list] = {}  # torch keeps a step count per parameter
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
                state["step"] += 1
                by_step.setdefault(int(state["step"]), []).append(p)
            beta1, beta2 = group["betas"]
            for step, params in by_step.items():
                self.adamw_step(
                    params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                    [self.state[p]["exp_avg_sq"] for p in params], [self.model_params.get(p) for p in params],
                    lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=step, grad_scale=grad_scale)
        return loss


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
        # the config's schedule wins over a resumed checkpoint's (the loop warns when they differ)
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
