"""Dataset samples -> policy inputs: prompt tokens, padded state/action vectors, and the
per-sample flow-matching noise and time.

Noise and time are drawn in the training process from a generator seeded by (run seed, sample
index, how many times this process has drawn for that index), so a sample gets the same draw
whichever data-parallel rank reads it: a 2-rank run sees the same numbers as a 1-rank run.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from loongforge.config import ConfigError

from loongforge_embodied.flow_matching import FlowMatching
from loongforge_embodied.pi05.config import PiConfig
from loongforge_embodied.pi05.prompt import pi0_prompt, pi05_prompt, tokenize


def check_dims(ds, pc: PiConfig, where: str) -> None:
    """The dataset's state/action widths (from info.json) must fit the model's padded widths."""
    for what, have, room, key in (("state", ds.state_dim, pc.max_state_dim, "max_state_dim"),
                                  ("action", ds.action_dim, pc.max_action_dim, "max_action_dim")):
        if have > room:
            raise ConfigError(f"{where}: the dataset's {what} has {have} dims, more than the model's "
                              f"{room} (config key 'vla.model.{key}')")
    if ds.chunk_size != pc.chunk_size:
        raise ConfigError(f"{where}: dataset chunk {ds.chunk_size} != vla.model.chunk_size {pc.chunk_size}")
    if not ds.cameras:
        raise ConfigError(f"{where}: no camera (video feature) to feed the vision tower")


def pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim to ``width`` (openpi's ``pad_vector``)."""
    out = x.new_zeros(*x.shape[:-1], width)
    out[..., :x.shape[-1]] = x
    return out


class PolicySamples(torch.utils.data.Dataset):
    """Wraps a :class:`LeRobotV3Dataset`; ``sample["index"]`` keys the noise draw."""

    def __init__(self, base, pc: PiConfig, tokenizer, max_length: int):
        self.base, self.pc, self.tokenizer, self.max_length = base, pc, tokenizer, max_length

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        s = self.base[i]
        pc = self.pc
        prompt = pi05_prompt(s["task"], s["state"].numpy()) if pc.mode == "pi05" else pi0_prompt(s["task"])
        tokens, mask = tokenize(self.tokenizer, [prompt], self.max_length)
        return {"images": s["images"], "image_masks": torch.ones(s["images"].shape[0], dtype=torch.bool),
                "tokens": tokens[0], "token_masks": mask[0],
                "state": pad(s["state"], pc.max_state_dim), "actions": pad(s["actions"], pc.max_action_dim),
                "action_valid": s["action_valid"], "index": i}


class NoiseSource:
    """(noise [B, chunk, A], time [B]) for a batch of sample indices, reproducible per sample."""

    def __init__(self, seed: int, flow: FlowMatching, chunk: int, width: int):
        self.seed, self.flow, self.shape = seed, flow, (chunk, width)
        self.visits: Counter = Counter()

    def __call__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        noise, times = [], []
        for i in np.asarray(indices).tolist():
            g = torch.Generator().manual_seed(hash((self.seed, int(i), self.visits[int(i)])) & 0x7FFF_FFFF_FFFF)
            self.visits[int(i)] += 1
            noise.append(torch.randn(self.shape, generator=g))
            times.append(self.flow.sample_time(1, generator=g))
        return torch.stack(noise), torch.cat(times)
