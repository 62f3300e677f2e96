"""Multimodal conversations -> model samples.

A record is LLaVA-style: ``{"messages": [{"role": "user", "content": "<image>\\nWhat is it?"},
{"role": "assistant", "content": "A red square."}], "images": ["img/0001.png"]}``; image paths are
relative to the jsonl file. Each ``<image>`` placeholder (in order) becomes
``<|vision_start|>`` + one ``<|image_pad|>`` per LLM image token + ``<|vision_end|>``; the
conversation is rendered with the chat template and only assistant answers carry loss
(``loongforge.data.sft.ChatEncoder``). Images are checked (opened, sized) when the dataset is
built, so a bad or missing image fails before training, naming the file, line and image; with
``data.on_error=skip`` such records are skipped and counted instead.

A sample holds the pre-training keys (``tokens``, ``labels``, ``loss_mask``, ``position_ids``,
[s] each, padded to ``seq_length``) plus ``mrope_position_ids`` [3, s] (Qwen2-VL positions for
the Qwen2.5 processor, plain positions otherwise), ``pixel_values`` (the processor's layout: Qwen2.5
patches [patches, C*T*P*P]; fixed-size images [images, C, S, S]) and ``image_grid_thw`` [images, 3]; :func:`collate` stacks the former and
concatenates the images of a micro-batch in sample order (the order the model scatters them in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from loongforge.data.errors import DataError
from loongforge.data.sft import ChatEncoder
from loongforge.data.tokenizer import pad_token_id

from loongforge_vlm.data.positions import mrope_positions
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor

PLACEHOLDER = "<image>"


@dataclass
class Record:
    where: str  # file:line, for error messages
    messages: list[dict]
    images: list[Path]
    grids: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class Stats:
    samples: int = 0
    images: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.samples} conversations with {self.images} images; {self.skipped} skipped"


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from None


def read_records(paths, processor, on_error: str, stats: Stats) -> list[Record]:
    out = []
    for file in paths:
        file = Path(file)
        if not file.is_file():
            raise DataError(f"data file not found: {file}")
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{file}:{n}"
            try:
                rec = json.loads(line)
                messages = rec.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise DataError("record has no 'messages' list")
                images = [file.parent / p for p in rec.get("images") or []]
                placeholders = sum(str(m.get("content", "")).count(PLACEHOLDER) for m in messages)
                if placeholders != len(images):
                    raise DataError(f"{placeholders} {PLACEHOLDER} placeholders but {len(images)} images")
                record = Record(where, messages, images)
                for p in images:
                    img = _open(p)
                    h, w = processor.target_size(img.height, img.width)
                    record.grids.append((1, h // processor.patch_size, w // processor.patch_size))
            except (DataError, json.JSONDecodeError, ValueError) as exc:
                msg = f"{where}: {exc}"
                if on_error != "skip":
                    raise DataError(f"{msg} (set data.on_error=skip to skip such samples)") from None
                stats.skipped += 1
                stats.errors.append(msg)
                continue
            out.append(record)
    return out


class VLMConversationDataset(torch.utils.data.Dataset):
    def __init__(self, paths, tokenizer, processor, *, seq_length: int,
                 image_token: str, vision_start: str, vision_end: str, chat_template: str = "chatml",
                 loss_on: str = "assistant", on_error: str = "raise"):
        self.processor, self.seq_length, self.on_error = processor, seq_length, on_error
        self.stats = Stats()
        self.encoder = ChatEncoder(tokenizer, chat_template, loss_on)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.pad_id = pad_token_id(tokenizer)
        self.tokens = (image_token, vision_start, vision_end)
        self.records = []
        for rec in read_records(paths, processor, on_error, self.stats):
            try:
                ids, mask = self._encode(rec)
            except DataError as exc:
                if on_error != "skip":
                    raise
                self.stats.skipped += 1
                self.stats.errors.append(str(exc))
                continue
            self.records.append((rec, ids, mask))
            self.stats.images += len(rec.images)
        self.stats.samples = len(self.records)
        if not self.records:
            raise DataError(f"no usable conversations in {list(map(str, paths))} ({self.stats.summary()})")

    def _encode(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        image, start, end = self.tokens
        grids = iter(rec.grids)
        messages = []
        for m in rec.messages:
            parts = str(m.get("content", "")).split(PLACEHOLDER)
            text = parts[0]
            for part in parts[1:]:
                text += start + image * self.processor.num_tokens(next(grids)) + end + part
            messages.append({**m, "content": text})
        ids, mask = self.encoder.encode(messages)
        if len(ids) - 1 > self.seq_length:
            raise DataError(f"{rec.where}: the conversation has {len(ids)} tokens with its image tokens, more than "
                            f"train.seq_length + 1 = {self.seq_length + 1} (raise it or lower max_pixels)")
        if mask[1:].sum() == 0:
            raise DataError(f"{rec.where}: no token carries loss (no assistant answer)")
        return ids, mask

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec, ids, mask = self.records[i]
        s = self.seq_length
        n = len(ids) - 1
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        tokens[:n], labels[:n], loss_mask[:n] = ids[:-1], ids[1:], mask[1:]
        pixels, grids = [], []
        for path in rec.images:
            try:
                p, g = self.processor(_open(path))
            except DataError as exc:
                raise DataError(f"{rec.where}: {exc}") from None
            pixels.append(p)
            grids.append(g)
        tokens_t = torch.from_numpy(tokens)
        p = self.processor
        return {
            "tokens": tokens_t,
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(s),
            "mrope_position_ids": (mrope_positions(tokens_t, grids, self.image_token_id, p.merge_size)
                                   if isinstance(p, Qwen2_5ImageProcessor) else torch.arange(s).expand(3, s)),
            "pixel_values": torch.cat(pixels) if pixels else p.empty_pixels(),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long).view(-1, 3),
        }


IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k not in IMAGE_KEYS}
    for k in IMAGE_KEYS:
        out[k] = torch.cat([s[k] for s in samples])
    return out
