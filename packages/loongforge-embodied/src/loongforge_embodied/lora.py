"""LoRA for the plain ``nn.Linear`` layers of the VLA networks.

The core's LoRA (``loongforge.peft.lora``) wraps megatron-core's parallel linears; the VLA
networks are plain torch, so this module adds the same low-rank update to ``nn.Linear``:
``y = W x + (alpha / r) * B(A(dropout(x)))`` with ``B`` zero-initialised (the model starts equal
to the base), the base weight frozen. :func:`apply_lora` swaps matching linears in place.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.dropout(x))) * self.scale

    def merged(self) -> torch.Tensor:
        return self.base.weight + (self.lora_b.weight @ self.lora_a.weight) * self.scale


def apply_lora(module: nn.Module, pattern: str, rank: int, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap every ``nn.Linear`` whose qualified name matches ``pattern`` (``re.fullmatch``);
    returns the wrapped names. Parameters outside the adapters are left as they are (freeze them
    separately)."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    for n in names:
        parent, _, leaf = n.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, dropout))
    return names


def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every adapter folded into its base weight, under the base names."""
    out = {}
    lora = {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    for name, t in module.state_dict().items():
        owner = next((n for n in lora if name.startswith(n + ".")), None)
        if owner is None:
            out[name] = t
        elif name == f"{owner}.base.weight":
            out[f"{owner}.weight"] = lora[owner].merged().detach()
        elif name == f"{owner}.base.bias":
            out[f"{owner}.bias"] = t
    return out
