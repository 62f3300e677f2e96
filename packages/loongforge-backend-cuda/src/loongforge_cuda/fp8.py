"""FP8 linear layers for megatron-core's Column/RowParallelLinear (config section ``precision.fp8``).

:func:`apply_fp8` gives each chosen linear layer an instance ``_forward_impl`` (megatron's hook for its
GEMM, looked up on the instance first) that runs ``loongforge_kernels.fp8_linear.fp8_linear`` (plus the
bias, if any) for the plain case (no sequence parallelism or data-gradient all-reduce, trained weight) and the
layer's own implementation otherwise; :meth:`FP8Layers.remove` restores the layers. Nothing is
patched at import time; the CUDA backend applies it in ``after_data_parallel`` (after DDP, so the
weight gradient accumulates into ``main_grad`` as megatron's gradient-accumulation fusion does).

- ``exclude``: fnmatch patterns on module names (wrapper prefixes ``module.`` removed), plus ``first``
  / ``last`` for the first / last transformer layer (megatron's global ``layer_number``). Default:
  the LM head (``output_layer``) and the first and last layers stay bf16.
- A GEMM a recipe does not cover (blockwise: a dimension not a multiple of 128, tokens included;
  others: multiples of 16) stays bf16, said once per layer in the log.
- ``adaptive``: each distinct GEMM shape is timed once (forward + both gradients, quantisation
  included) in bf16 and in every recipe that covers it; the fastest whose output and data-gradient
  error vs fp32 is within ``error_budget`` wins. Each shape's table and each layer's choice are
  printed and logged.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from loongforge.config import ConfigError

log = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise", "blockwise")
MODES = (*RECIPES, "adaptive")
#: torch's scaled matmul on CUDA needs FP8 tensor cores (Ada / Hopper and newer)
MIN_CAPABILITY = (8, 9)


def say(message: str) -> None:
    """Log and print (the bench and the run log both show the choices)."""
    log.info(message)
    print(f"[fp8] {message}", flush=True)


def check_fp8_config(fp8_cfg, device_type: str, capability: tuple[int, int] | None) -> str | None:
    """The recipe ``precision.fp8`` asks for, or None; refuses what cannot run, naming the key."""
    recipe = fp8_cfg.get("recipe") if fp8_cfg is not None else None
    if recipe in (None, "", "none", "off"):
        return None
    if recipe not in MODES:
        raise ConfigError(f"config key 'precision.fp8.recipe': {recipe!r} is not one of {', '.join(MODES)}")
    if device_type != "cuda":
        raise ConfigError(f"config key 'precision.fp8.recipe': FP8 GEMMs need a CUDA device, this run is on "
                          f"{device_type!r}")
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        raise ConfigError(f"config key 'precision.fp8.recipe': FP8 GEMMs need compute capability >= 8.9 "
                          f"(Ada, Hopper or newer); this GPU has {capability}")
    budget = float(fp8_cfg.get("error_budget", 0.08))
    if recipe == "adaptive" and not budget > 0:
        raise ConfigError(f"config key 'precision.fp8.error_budget': must be > 0, got {budget}")
    return recipe


def _short(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def excluded(name: str, layer_number: int | None, num_layers: int, patterns) -> str | None:
    """The exclude pattern that keeps module ``name`` in bf16, or None."""
    short = _short(name)
    for pattern in patterns:
        if pattern == "first" and layer_number == 1:
            return pattern
        if pattern == "last" and layer_number == num_layers:
            return pattern
        if fnmatch.fnmatchcase(short, pattern) or fnmatch.fnmatchcase(short, f"*.{pattern}"):
            return pattern
    return None


def linear_layers(modules):
    """``(name, module, layer_number or None, num_layers)`` for every megatron Column/RowParallelLinear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for root in modules:
        owner: dict[int, int] = {}
        for layer in root.modules():
            if isinstance(layer, TransformerLayer):
                for sub in layer.modules():
                    owner[id(sub)] = layer.layer_number
        for name, module in root.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                yield name, module, owner.get(id(module)), module.config.num_layers


@dataclass
class AdaptiveChooser:
    """Per GEMM shape ``(m, n, k)``: the fastest of bf16 and the covering recipes within ``budget``.
    ``measure(candidate, m, n, k) -> (ms, relative error)`` (default: :func:`measure_candidate`)."""

    budget: float
    measure: object = None
    choices: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)

    def choose(self, m: int, n: int, k: int) -> str:
        from loongforge_kernels.fp8_linear import supports

        key = (m, n, k)
        if key in self.choices:
            return self.choices[key]
        measure = self.measure or measure_candidate
        with torch.enable_grad():  # the first call may come from an evaluation or a no-grad forward
            report = {c: measure(c, m, n, k) for c in ("bf16", *RECIPES) if c == "bf16" or supports(c, m, n, k)}
        within = [c for c, (ms, err) in report.items() if c == "bf16" or err <= self.budget]
        best = min(within, key=lambda c: report[c][0])
        self.choices[key], self.reports[key] = best, report
        say(f"adaptive GEMM {m}x{k} @ {k}x{n} (fwd+dgrad+wgrad): "
            + ", ".join(f"{c} {ms:.3f} ms" + ("" if c == "bf16" else f" err {err:.4f}") for c, (ms, err) in report.items())
            + f" -> {best} (error budget {self.budget})")
        return best


def measure_candidate(candidate: str, m: int, n: int, k: int, reps: int = 5) -> tuple[float, float]:
    """CUDA-event time of forward + data and weight gradients of ``[m, k] x [n, k]^T`` in bf16 or an
    FP8 recipe (quantisation included), and the worse relative error of output and data gradient
    vs the fp32 product."""
    from loongforge_kernels.fp8_linear import fp8_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16().requires_grad_()
    dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()

    def run():
        y = torch.nn.functional.linear(x, w) if candidate == "bf16" else fp8_linear(x, w, candidate)
        y.backward(dy)
        return y

    y = run()
    err = 0.0
    if candidate != "bf16":
        xf, wf = x.detach().float().requires_grad_(), w.detach().float()
        ref = xf @ wf.t()
        ref.backward(dy.float())
        err = max(float((y.float() - ref).norm() / ref.norm()), float((x.grad.float() - xf.grad).norm() / xf.grad.norm()))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        x.grad = w.grad = None
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, err


class FP8ForwardImpl:
    """A linear layer's ``_forward_impl``: FP8 for the plain case, the layer's own otherwise."""

    def __init__(self, name: str, recipe: str, chooser: AdaptiveChooser | None, original, impl: str = "scaled_mm"):
        self.name, self.recipe, self.chooser, self.original, self.impl = name, recipe, chooser, original, impl
        self.told: set = set()
        self.calls: dict = {}  # recipe -> number of FP8/bf16 calls (tests, reports)

    def _once(self, key, message: str) -> None:
        if key not in self.told:
            self.told.add(key)
            say(message)

    def __call__(self, *args, **kw):
        from loongforge_kernels.fp8_linear import fp8_linear, supports

        x, weight = kw.get("input"), kw.get("weight")
        plain = (not args and x is not None and weight is not None
                 and not kw.get("allreduce_dgrad") and not kw.get("sequence_parallel")
                 and kw.get("grad_output_buffer") is None and (kw.get("gtp_remat_size") or 1) == 1
                 and weight.requires_grad and x.dtype in (torch.bfloat16, torch.float16))
        if not plain:
            self._once("plain", f"{self.name}: sequence parallelism, a data-gradient all-reduce or a frozen "
                       "weight: stays bf16")
            return self.original(*args, **kw)
        n, k = weight.shape
        m = x.numel() // k
        recipe = self.chooser.choose(m, n, k) if self.chooser is not None else self.recipe
        if recipe != "bf16" and not supports(recipe, m, n, k):
            self._once(("dims", recipe, m, n, k), f"{self.name}: GEMM {m}x{k} @ {k}x{n} not covered by {recipe} "
                       "(a dimension not a multiple of its block): stays bf16")
            recipe = "bf16"
        self._once(("choice", m, n, k), f"{self.name}: GEMM {m}x{k} @ {k}x{n} -> {recipe}")
        self.calls[recipe] = self.calls.get(recipe, 0) + 1
        if recipe == "bf16":
            return self.original(*args, **kw)
        out = fp8_linear(x, weight, recipe, self.impl, bool(kw.get("gradient_accumulation_fusion")))
        bias = kw.get("bias")
        return out if bias is None else out + bias


@dataclass
class FP8Layers:
    """What :func:`apply_fp8` changed; :meth:`remove` undoes it."""

    applied: dict = field(default_factory=dict)  # name -> module
    kept: dict = field(default_factory=dict)  # name -> reason
    chooser: AdaptiveChooser | None = None

    def remove(self) -> None:
        for module in self.applied.values():
            if isinstance(module.__dict__.get("_forward_impl"), FP8ForwardImpl):
                del module._forward_impl
        self.applied.clear()


def apply_fp8(modules, recipe: str, exclude=("output_layer", "first", "last"), error_budget: float = 0.08,
              impl: str = "scaled_mm", measure=None) -> FP8Layers:
    """Switch megatron's linear layers in ``modules`` to FP8 ``recipe`` (or ``adaptive``) except the
    ``exclude``\\ d ones; see the module docstring."""
    if recipe not in MODES:
        raise ConfigError(f"config key 'precision.fp8.recipe': {recipe!r} is not one of {', '.join(MODES)}")
    result = FP8Layers(chooser=AdaptiveChooser(error_budget, measure) if recipe == "adaptive" else None)
    for name, module, layer_number, num_layers in linear_layers(modules):
        reason = excluded(name, layer_number, num_layers, exclude)
        if reason is not None:
            result.kept[_short(name)] = f"excluded ({reason})"
            continue
        module._forward_impl = FP8ForwardImpl(_short(name), recipe, result.chooser, module._forward_impl, impl)
        result.applied[_short(name)] = module
    say(f"recipe {recipe}: {len(result.applied)} linear layers in FP8, kept in bf16: "
        + (", ".join(f"{n} ({r})" for n, r in result.kept.items()) or "none"))
    return result
