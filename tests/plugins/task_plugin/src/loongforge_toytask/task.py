"""``toy_regression``: a linear map learnt from seeded synthetic pairs, unit = samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loongforge.task import TrainTask
from megatron.core.transformer import MegatronModule, TransformerConfig


@dataclass
class ToyConfig:
    dim: int = 4
    samples: int = 64


class Pairs(torch.utils.data.Dataset):
    def __init__(self, dim: int, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, dim, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Linear(MegatronModule):
    def __init__(self, config: TransformerConfig, dim: int):
        super().__init__(config)
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, y):
        return ((self.proj(x) - y) ** 2).mean(-1)  # per-sample loss [b]


def per_sample_loss(losses: torch.Tensor):
    total, count = losses.sum(), torch.tensor(losses.numel(), dtype=torch.int)
    return total, count, {"loss_sum": total.detach().clone(), "tokens": count, "sq_error": total.detach().clone()}


class RegressionTask(TrainTask):
    unit = "samples"
    logged_values = ("sq_error",)

    def build_datasets(self):
        return Pairs(self.cfg.toy.dim, self.cfg.toy.samples, self.cfg.seed), None

    def build_model(self):
        config = TransformerConfig(num_layers=1, hidden_size=self.cfg.toy.dim, num_attention_heads=1)
        return [Linear(config, self.cfg.toy.dim).to(self.rt.backend.device())]

    def forward_step(self, batch, model):
        device = self.rt.backend.device()
        return model(batch["x"].to(device), batch["y"].to(device)), per_sample_loss

    def flops_per_unit(self):
        return 6.0 * self.cfg.toy.dim**2

    def save_extra(self, ckpt_dir):
        (ckpt_dir / "toy.txt").write_text(f"dim={self.cfg.toy.dim}\n")


def generate(checkpoint, *, prompt, output, seed, num_steps):
    return f"toy generate from {checkpoint} (prompt={prompt!r}, steps={num_steps})"
