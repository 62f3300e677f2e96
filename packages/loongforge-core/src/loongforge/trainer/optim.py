"""megatron-core's optimizer (plain or distributed) and its LR/WD scheduler from the config.

Memory levers (config section ``precision``, see ``loongforge.config.schema.PrecisionConfig``):

- ``precision.exp_avg_dtype`` / ``exp_avg_sq_dtype: bf16``: AdamW moments stored in bf16, updated in
  fp32 (:class:`LowPrecisionMomentsAdamW`; works without Transformer Engine). The backend's
  fused ``adamw_step`` kernel keeps fp32 moments, so it is bypassed then (said in the log).
- ``precision.use_precision_aware_optimizer``: megatron-core's own (moments and optionally the
  master weights, ``main_params_dtype``, in bf16), which needs Transformer Engine's ``FusedAdam``
  and the distributed optimizer; refused clearly where TE does not import.
- ``precision.optimizer_cpu_offload``: megatron-core's ``HybridDeviceOptimizer`` (optimizer state
  and step on the host, torch's AdamW; the fraction ``optimizer_offload_fraction``); CUDA backends
  with the distributed optimizer only (its copies run on CUDA streams).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from loongforge.config import ConfigError
from loongforge.trainer.multi_tensor import fold_clipping_into

_DECAY_STYLES = {"constant": "constant", "cosine": "cosine", "wsd": "WSD", "linear": "linear"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
log = logging.getLogger(__name__)


def precision_options(cfg, backend) -> dict:
    """The ``precision`` section's optimizer levers as megatron ``OptimizerConfig`` keywords plus
    ``moments`` (our bf16-moment AdamW's dtypes, or None), validated against the backend and what is
    installed. Bad input raises ``ConfigError`` naming the key."""
    p, o = cfg.get("precision"), cfg.optimizer
    if p is None:
        return {"moments": None}
    dtypes = {}
    for key in ("exp_avg_dtype", "exp_avg_sq_dtype", "main_params_dtype"):
        if p[key] not in _DTYPES:
            raise ConfigError(f"config key 'precision.{key}': {p[key]!r} is not one of {', '.join(_DTYPES)}")
        dtypes[key] = _DTYPES[p[key]]
    low = {k: v for k, v in dtypes.items() if v != torch.float32}
    if low and o.name != "adam":
        raise ConfigError(f"config key 'precision.{next(iter(low))}': low-precision optimizer state needs "
                          f"optimizer.name=adam, got {o.name!r}")
    if low and cfg.train.precision != "bf16":
        raise ConfigError(f"config key 'precision.{next(iter(low))}': needs train.precision=bf16 "
                          f"(got {cfg.train.precision!r})")
    out: dict = {"moments": None}
    if p.optimizer_cpu_offload:
        if backend.name != "cuda":
            raise ConfigError("config key 'precision.optimizer_cpu_offload': megatron-core's host offload runs "
                              f"its copies on CUDA streams; backend {backend.name!r} has none")
        if not o.distributed:
            raise ConfigError("config key 'precision.optimizer_cpu_offload' needs optimizer.distributed=true "
                              "(megatron-core offloads the distributed optimizer's state)")
        if not 0.0 < p.optimizer_offload_fraction <= 1.0:
            raise ConfigError("config key 'precision.optimizer_offload_fraction': must be in (0, 1], got "
                              f"{p.optimizer_offload_fraction}")
        out.update(optimizer_cpu_offload=True, optimizer_offload_fraction=float(p.optimizer_offload_fraction))
    if p.use_precision_aware_optimizer:
        if importlib.util.find_spec("transformer_engine") is None and not p.optimizer_cpu_offload:
            raise ConfigError(
                "config key 'precision.use_precision_aware_optimizer': megatron-core's precision-aware optimizer "
                "needs Transformer Engine's FusedAdam, which is not installed (pip install 'loongforge-backend-cuda[te]'); "
                "without it, precision.exp_avg_dtype/exp_avg_sq_dtype=bf16 use LoongForge's bf16-moment AdamW")
        if not o.distributed:
            raise ConfigError("config key 'precision.use_precision_aware_optimizer' needs optimizer.distributed=true "
                              "(megatron-core supports it with the distributed optimizer only)")
        out.update(use_precision_aware_optimizer=True, **dtypes)
        return out
    if dtypes["main_params_dtype"] != torch.float32:
        raise ConfigError("config key 'precision.main_params_dtype': bf16 master weights need "
                          "precision.use_precision_aware_optimizer=true (megatron-core with Transformer Engine)")
    if low:
        out["moments"] = (dtypes["exp_avg_dtype"], dtypes["exp_avg_sq_dtype"])
    return out


def build_optimizer(cfg, ddp_chunks, backend):
    o = cfg.optimizer
    if o.distributed and not backend.supports_distributed_optimizer:
        raise ConfigError(f"config key 'optimizer.distributed': backend {backend.name!r} has no distributed optimizer")
    bf16 = cfg.train.precision == "bf16"
    extra = precision_options(cfg, backend)
    moments = extra.pop("moments")
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer=o.name, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=cfg.train.grad_clip,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed, **extra,
    ), ddp_chunks)
    if extra:  # megatron's own precision-aware / offloaded optimizer: its step stays as it is
        log.info("optimizer: megatron-core's %s; the fused adamw_step kernel is not used",
                 ", ".join(k for k in ("use_precision_aware_optimizer", "optimizer_cpu_offload") if extra.get(k)))
        return optimizer
    return use_fused_adam(optimizer, adamw_step=backend.kernel("adamw_step"), moments=moments)


def use_fused_adam(optimizer, adamw_step=None, moments=None):
    """Switch megatron-core's torch Adam/AdamW (its choice without TE or apex, built with torch's
    default multi-tensor path) to a fused step: the backend's ``adamw_step`` kernel where given
    and applicable (:class:`KernelAdamW`), else torch's fused kernel, one pass over parameters,
    gradients and both moments instead of a dozen ``_foreach`` passes (only where torch has it
    for every parameter's device). An optimizer fused throughout also takes gradient clipping
    into that kernel (``multi_tensor.fold_clipping_into``).

    ``moments``: ``(exp_avg dtype, exp_avg_sq dtype)`` other than fp32 makes every torch AdamW a
    :class:`LowPrecisionMomentsAdamW` instead (the kernel and torch's fused step keep fp32 moments)."""
    fused_devices = set(torch.utils._foreach_utils._get_fused_kernels_supported_devices())
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        if moments is not None:
            if LowPrecisionMomentsAdamW.install(torch_opt, *moments):
                if adamw_step is not None:
                    log.info("optimizer: AdamW moments in %s/%s: the fused adamw_step kernel (fp32 moments) is "
                             "bypassed for LowPrecisionMomentsAdamW", *moments)
                fold_clipping_into(torch_opt)
                continue
            raise ConfigError("config key 'precision.exp_avg_dtype': low-precision moments need torch's AdamW "
                              f"(decoupled weight decay), got {type(torch_opt).__name__}")
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


class LowPrecisionMomentsAdamW(torch.optim.AdamW):
    """torch's AdamW (same hyper-parameters and state keys) whose ``exp_avg`` / ``exp_avg_sq`` are
    stored in ``moment_dtypes`` (e.g. bf16: 8 instead of 16 bytes per parameter) and updated in fp32:
    per chunk of at most ``CHUNK`` elements the moments are read into fp32, updated exactly as
    ``torch.optim.adam._single_tensor_adam`` does, the parameter (fp32 master) stepped with the fp32
    values, and the moments written back rounded to nearest. State from a checkpoint or from
    megatron's ``init_state_fn`` in another dtype is converted on the next step. Reads the clipping
    factor as ``grad_scale`` (``multi_tensor.fold_clipping_into``)."""

    moment_dtypes: tuple = (torch.float32, torch.float32)
    reads_grad_scale = True
    #: elements per fp32 working chunk (bounds the step's temporary memory to ~1 GiB)
    CHUNK = 1 << 26

    @classmethod
    def install(cls, torch_opt, exp_avg_dtype, exp_avg_sq_dtype) -> bool:
        if (type(torch_opt) not in (torch.optim.AdamW, cls)
                or any(g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"]
                       for g in torch_opt.param_groups)):
            return False
        for group in torch_opt.param_groups:
            group["fused"], group["foreach"] = False, False
        torch_opt.__class__ = cls
        torch_opt.moment_dtypes = (exp_avg_dtype, exp_avg_sq_dtype)
        torch_opt._patch_step_function()
        return True

    def _state(self, p):
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key, dtype in zip(("exp_avg", "exp_avg_sq"), self.moment_dtypes, strict=True):
            t = state.get(key)
            if t is None:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            elif t.dtype != dtype:
                state[key] = t.to(dtype).contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                step = float(state["step"])
                bc1, bc2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
                flat = [t.view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), self.CHUNK):
                    pc, gc, mc, vc = (t[start:start + self.CHUNK] for t in flat)
                    g = gc.float()
                    if grad_scale is not None:
                        g = g / grad_scale.to(g.device)
                    m, v = mc.float(), vc.float()
                    if wd != 0:
                        pc.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    pc.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)
                    mc.copy_(m)
                    vc.copy_(v)
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
