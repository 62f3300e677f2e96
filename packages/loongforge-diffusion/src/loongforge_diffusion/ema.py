"""Exponential moving average of the DiT's trainable weights (``diffusion.ema_decay`` > 0).

After every optimizer step ``ema = decay * ema + (1 - decay) * weight`` (fp32, on the weights'
device). The EMA is written with every checkpoint as ``ema.safetensors`` beside it (our parameter
names, full tensors: tensor parallelism is refused with EMA) and ``loongforge generate`` samples
with it when present. A resumed run restarts the average from the resumed weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

FILE = "ema.safetensors"


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / FILE
        save_file({n: t.contiguous().cpu() for n, t in self.shadow.items()}, str(path))
        return path


def load_ema_into(module: torch.nn.Module, folder: str | Path) -> bool:
    """Copy a saved EMA into ``module``'s parameters; ``False`` when there is none."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        return False
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(path)).items():
            params[n].copy_(t.to(params[n].dtype))
    return True
