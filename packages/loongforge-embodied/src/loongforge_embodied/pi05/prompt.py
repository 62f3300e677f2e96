"""The Pi0.5 prompt: the task text plus the robot state as 256-bin discrete tokens (openpi's
``PaligemmaTokenizer``, lerobot's ``Pi05PrepareStateTokenizerProcessorStep``).

The state, normalised to [-1, 1], is cut into 256 equal bins (``np.digitize`` on 256 left edges
of linspace(-1, 1, 257), minus 1) and written as numbers: ``"Task: pick up the cube, State: 12
200 131;\\nAction: "``. Pi0 keeps the state as a continuous token and uses the task text alone.
The text is tokenised by a local HF tokenizer (PaliGemma's for real checkpoints) or, for the tiny
runs that have none, by :class:`ByteTokenizer` (UTF-8 bytes).
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 256


def discretize(state: np.ndarray) -> np.ndarray:
    """[..., D] in [-1, 1] -> integer bins in [0, 255]; as in lerobot, values >= 1 give 255 and
    values < -1 give -1 (not clipped, so prompts match the reference's)."""
    return np.digitize(np.asarray(state), bins=np.linspace(-1, 1, BINS + 1)[:-1]) - 1


def pi05_prompt(task: str, state: np.ndarray) -> str:
    clean = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {clean}, State: {' '.join(map(str, discretize(state)))};\nAction: "


def pi0_prompt(task: str) -> str:
    return task.strip().replace("_", " ").replace("\n", " ") + "\n"


class ByteTokenizer:
    """UTF-8 bytes -> ids ``byte + 1`` (0 is padding); vocabulary 257."""

    vocab_size = 257
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def save_pretrained(self, path) -> None:  # nothing to save: the tokenizer is its definition
        pass


class HFTokenizer:
    """A local HF tokenizer directory (``transformers.AutoTokenizer``, ``trust_remote_code`` off)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.vocab_size = len(self.tok)
        self.pad_id = self.tok.pad_token_id or 0

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def save_pretrained(self, path) -> None:
        self.tok.save_pretrained(str(path))


def load_tokenizer(path: str | None):
    return ByteTokenizer() if path in (None, "", "builtin:bytes") else HFTokenizer(path)


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask [B, max_length]; a prompt longer than ``max_length`` is an error
    (truncating would cut the state tokens)."""
    ids = torch.full((len(prompts), max_length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        t = tokenizer.encode(p)
        if len(t) > max_length:
            raise ValueError(f"prompt of {len(t)} tokens exceeds vla.tokenizer_max_length={max_length}: {p!r}")
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = True
    return ids, mask
