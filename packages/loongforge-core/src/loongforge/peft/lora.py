"""LoRA adapters on megatron-core's tensor-parallel linears.

``apply_lora(chunk, rank=8, alpha=16, target_modules=["qkv", "proj", "fc1", "fc2"])`` freezes every
parameter of the chunk and gives each targeted linear two trainable matrices ``lora_A`` [r, in]
and ``lora_B`` [out, r]: ``y = W x + (alpha / r) * B A dropout(x)``. Parameter names stay those of
the base model (``...linear_qkv.weight``) plus ``...linear_qkv.lora_A`` / ``lora_B``, so HF weight
loading and export keep working; the module's class is swapped for a subclass with the LoRA
forward (and its checkpoint sharding).

Tensor parallelism (TP ranks ``r``):

* column-parallel (``linear_qkv``, ``linear_fc1``; output dim sharded): ``A`` replicated,
  ``B`` sharded on its output dim like the weight. ``h = x A^T`` goes through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), so the
  gradients of ``h`` -- and hence of ``A`` and of the input -- are summed over the ranks' output
  shards. With sequence parallelism ``h`` is computed on the local sequence shard and all-gathered
  (reduce-scatter backward); ``A`` is then marked ``sequence_parallel`` so megatron-core all-reduces
  its gradient over TP like a norm weight's.
* row-parallel (``linear_proj``, ``linear_fc2``; input dim sharded): ``A`` sharded on its input dim
  like the weight, ``B`` replicated. ``h = x_r A_r^T`` is a partial sum, all-reduced by
  ``reduce_from_tensor_model_parallel_region``; ``B h`` is then the full delta (scattered over the
  sequence under sequence parallelism, as the base output is).

``A`` is initialised (Kaiming-uniform, as PEFT does) from a generator seeded by the run seed and
the module name (with its global layer index), on the full matrix before sharding, so every TP/PP
layout starts from the same adapter; ``B`` starts at zero (the adapted model equals the base model at step 0).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from loongforge.config import ConfigError

TARGETS = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1", "fc2": "linear_fc2"}
_CLASSES: dict[type, type] = {}


class LoRAMixin:
    """Forward and checkpoint sharding of a LoRA-adapted megatron-core linear (see the module doc)."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    lora_scaling: float
    lora_dropout: float
    lora_column: bool  # column-parallel (else row-parallel)
    lora_swiglu: bool  # a gated MLP's fused [gate; up] fc1

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return out + self.lora_delta(input_).to(out.dtype), bias

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        A, B = self.lora_A, self.lora_B
        x = x.to(A.dtype)
        if self.lora_dropout and self.training:
            if self.lora_column and not self.sequence_parallel:
                x = F.dropout(x, self.lora_dropout)  # x replicated over TP: the default generator agrees
            else:  # x differs per TP rank (a hidden or sequence shard): per-rank streams, as megatron does
                with tp.get_cuda_rng_tracker().fork():
                    x = F.dropout(x, self.lora_dropout)
        if self.lora_column:
            h = F.linear(x, A)
            if self.sequence_parallel:
                h = tp.gather_from_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = tp.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            return F.linear(h, B) * self.lora_scaling
        h = tp.reduce_from_tensor_model_parallel_region(F.linear(x, A), group=self.tp_group)
        delta = F.linear(h, B) * self.lora_scaling
        if self.sequence_parallel:
            delta = tp.scatter_to_sequence_parallel_region(delta, group=self.tp_group)
        return delta

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        lora = make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix,
            {"lora_B": 0} if self.lora_column else {"lora_A": 1}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        if self.lora_swiglu:  # B's rows are [gate_r; up_r] on each rank, like the fc1 weight's
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_B"
            lora[key] = apply_swiglu_sharded_factory(
                lora[key], sharded_offsets, metadata.get("singleton_local_shards", False),
                tp_group=self.tp_group, dp_group=metadata["dp_cp_group"])
        sd.update(lora)
        return sd


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAMixin, cls), {})
    return _CLASSES[cls]


def _target_names(target_modules) -> set[str]:
    names = set()
    for t in target_modules:
        if t not in TARGETS and t not in TARGETS.values():
            raise ConfigError(f"config key 'peft.lora.target_modules': unknown module {t!r} (one of {', '.join(TARGETS)})")
        names.add(TARGETS.get(t, t))
    return names


def is_lora_param(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def apply_lora(chunk: torch.nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=("qkv", "proj", "fc1", "fc2"), seed: int = 0) -> list[str]:
    """Freeze ``chunk`` and add LoRA adapters to its targeted linears; returns the adapted module
    names (as in ``chunk.named_modules()``)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if rank < 1:
        raise ConfigError(f"config key 'peft.lora.rank' must be >= 1 for LoRA, got {rank}")
    targets = _target_names(target_modules)
    for p in chunk.parameters():
        p.requires_grad_(False)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    adapted = []
    for name, module in chunk.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or isinstance(module, LoRAMixin):
            continue
        if isinstance(module, ColumnParallelLinear):
            column = True
        elif isinstance(module, RowParallelLinear):
            column = False
        else:
            raise ConfigError(f"config key 'peft.lora.target_modules': LoRA target {name} is a {type(module).__name__}, not a megatron-core "
                            "Column/RowParallelLinear (Transformer Engine linears are not supported yet)")
        weight = module.weight
        out_local, in_local = weight.shape
        in_full = in_local if column else in_local * tp_size
        # full A from a generator of (seed, layer name): the same adapter under any TP layout
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(_seed_name(chunk, name).encode())) % 2**63)
        bound = 1.0 / math.sqrt(in_full)
        a_full = (torch.rand(rank, in_full, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        a = a_full if column else a_full.chunk(tp_size, dim=1)[tp_rank]
        module.lora_A = torch.nn.Parameter(a.to(device=weight.device, dtype=weight.dtype).contiguous())
        module.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, device=weight.device, dtype=weight.dtype))
        set_tensor_model_parallel_attributes(module.lora_A, not column, 1, 1)
        set_tensor_model_parallel_attributes(module.lora_B, column, 0, 1)
        if column and module.sequence_parallel:
            module.lora_A.sequence_parallel = True
        module.lora_scaling = float(alpha) / rank
        module.lora_dropout = float(dropout)
        module.lora_column = column
        module.lora_swiglu = column and leaf == "linear_fc1" and bool(getattr(module.config, "gated_linear_unit", False))
        module.__class__ = _lora_class(type(module))
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"config key 'peft.lora.target_modules': no {', '.join(sorted(targets))} in the model")
    return adapted


def apply_lora_config(chunks, cfg) -> list[str]:
    """Adapters on every chunk as the run config's ``peft.lora`` says (nothing when its rank is 0);
    the trainer, ``export-lora`` and ``generate`` build the same adapted model from a config."""
    lora = (cfg.get("peft") or {}).get("lora") or {}
    if int(lora.get("rank", 0)) < 1:
        return []
    adapted = []
    for chunk in chunks:
        adapted += apply_lora(chunk, int(lora["rank"]), float(lora.get("alpha", 16.0)), float(lora.get("dropout", 0.0)),
                              list(lora.get("target_modules", TARGETS)), seed=int(cfg.get("seed", 0)))
    return adapted


def _seed_name(chunk: torch.nn.Module, name: str) -> str:
    """``name`` without wrapper prefixes (``module.``) and with the global layer index (megatron's
    ``layer_number - 1``) in place of the chunk-local one, so every TP/PP layout seeds alike."""
    parts = name.split(".")
    for j in range(len(parts) - 1, 0, -1):
        if parts[j - 1] == "layers" and parts[j].isdigit():
            number = getattr(chunk.get_submodule(".".join(parts[: j + 1])), "layer_number", None)
            if number is not None:
                parts[j] = str(number - 1)
            break
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def lora_modules(model: torch.nn.Module) -> dict[str, LoRAMixin]:
    """``{module name: module}`` of the LoRA-adapted linears (wrappers looked through)."""
    while hasattr(model, "module"):
        model = model.module
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMixin)}


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters with every adapter merged into its weight (``W + s * B A``; TP=1)."""
    while hasattr(model, "module"):
        model = model.module
    state = {n: p.detach().clone() for n, p in model.named_parameters() if not is_lora_param(n)}
    for name, m in lora_modules(model).items():
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = (w.float() + m.lora_scaling * (m.lora_B.float() @ m.lora_A.float())).to(w.dtype)
    return state


def trainable_summary(chunks) -> dict[str, int]:
    """Trainable and total parameter counts of this rank's chunks (shared tensors once)."""
    seen, total, trainable = set(), 0, 0
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}
