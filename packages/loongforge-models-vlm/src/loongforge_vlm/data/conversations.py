"""Multimodal conversations -> model samples.

A record is LLaVA-style: ``{"messages": [{"role": "user", "content": "<image>\\nWhat is it?"},
{"role": "assistant", "content": "A red square."}], "images": ["img/0001.png"]}``; image paths are
relative to the jsonl file. Each ``<image>`` placeholder (in order) becomes
``<|vision_start|>`` + one ``<|image_pad|>`` per LLM image token + ``<|vision_end|>``. Videos work the
same way (``"videos": [...]`` and ``<video>`` placeholders; only with a ``video_processor``, e.g.
Qwen3-VL's, which turns a clip into timestamped frames, :mod:`loongforge_vlm.data.video`); the
conversation is rendered with the chat template and only assistant answers carry loss
(``loongforge.data.sft.ChatEncoder``). Images are checked (opened, sized) when the dataset is
built, so a bad or missing image fails before training, naming the file, line and image; with
``data.on_error=skip`` such records are skipped and counted instead.

A sample holds the pre-training keys (``tokens``, ``labels``, ``loss_mask``, ``position_ids``,
[s] each, padded to ``seq_length``) plus ``mrope_position_ids`` [3, s] (Qwen2-VL positions for
the Qwen2.5 processor, plain positions otherwise), ``pixel_values`` (the processor's layout: Qwen2.5
patches [patches, C*T*P*P]; fixed-size images [images, C, S, S]) and ``image_grid_thw`` [images, 3]; :func:`collate` stacks the former and
concatenates the images of a micro-batch in sample order (the order the model scatters them in).

With ``pack`` (``sft.packing``) several conversations share a row (the core's best-fit decreasing
bins, :func:`loongforge.data.sft.pack_best_fit`): ``position_ids`` and the three mrope axes restart
at 0 for each conversation (each computed as for that conversation alone), ``segment_ids`` number
the conversations (padding is one more segment) for ``data.document_attention``, and the row's
images are its conversations' images in order, so the model scatters each at its own tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from loongforge.data.errors import DataError
from loongforge.data.sft import ChatEncoder, pack_best_fit
from loongforge.data.tokenizer import pad_token_id

from loongforge_vlm.data.positions import mrope_positions
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor

PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


@dataclass
class Record:
    where: str  # file:line, for error messages
    messages: list[dict]
    images: list[Path]
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    #: per video: (sampled frame indices, grid, frame timestamps), from its metadata
    video_plans: list[tuple[list[int], tuple[int, int, int], list[float]]] = field(default_factory=list)


@dataclass
class Stats:
    samples: int = 0
    images: int = 0
    videos: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    packed: bool = False
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    def summary(self) -> str:
        videos = f" and {self.videos} videos" if self.videos else ""
        out = f"{self.samples} conversations with {self.images} images{videos}; {self.skipped} skipped"
        if self.packed:
            out += (f"; packed into {self.sequences} sequences, packing efficiency "
                    f"{self.real_tokens / max(1, self.padded_tokens):.1%}")
        return out


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


def _plan_videos(record: Record, rec: dict, file: Path, video_processor) -> None:
    from loongforge_vlm.data.video import probe

    videos = [file.parent / p for p in rec.get("videos") or []]
    placeholders = sum(str(m.get("content", "")).count(VIDEO_PLACEHOLDER) for m in record.messages)
    if placeholders != len(videos):
        raise DataError(f"{placeholders} {VIDEO_PLACEHOLDER} placeholders but {len(videos)} videos")
    if videos and video_processor is None:
        raise DataError("the record has videos but the image encoder has no video processor")
    for p in videos:
        info = probe(p)
        indices, grid = video_processor.plan(info)
        record.videos.append(p)
        record.video_plans.append((indices, grid, video_processor.timestamps(indices, info.fps)))


def read_records(paths, processor, on_error: str, stats: Stats, video_processor=None) -> list[Record]:
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
                    record.grids.append(processor.grid(img.height, img.width))
                _plan_videos(record, rec, file, video_processor)
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
                 loss_on: str = "assistant", on_error: str = "raise", pack: bool = False, seed: int = 0,
                 video_processor=None, video_token: str = ""):
        self.processor, self.seq_length, self.on_error, self.pack = processor, seq_length, on_error, pack
        self.video_processor, self.video_token = video_processor, video_token
        if video_processor is not None and not video_token:
            raise ValueError("a video processor needs the layout's video token (VLMLayout.video_token)")
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if video_processor is not None else None
        self.stats = Stats(packed=pack)
        self.encoder = ChatEncoder(tokenizer, chat_template, loss_on)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.pad_id = pad_token_id(tokenizer)
        self.tokens = (image_token, vision_start, vision_end)
        self.records = []
        for rec in read_records(paths, processor, on_error, self.stats, video_processor):
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
            self.stats.videos += len(rec.videos)
        self.stats.samples = len(self.records)
        if not self.records:
            raise DataError(f"no usable conversations in {list(map(str, paths))} ({self.stats.summary()})")
        lengths = [len(ids) - 1 for _, ids, _ in self.records]
        self.bins = pack_best_fit(lengths, seq_length, seed) if pack else [[i] for i in range(len(self.records))]
        self.stats.sequences = len(self.bins)
        self.stats.real_tokens = sum(lengths)
        self.stats.padded_tokens = len(self.bins) * seq_length

    def _encode(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        image, start, end = self.tokens
        grids, plans = iter(rec.grids), iter(rec.video_plans)
        messages = []
        for m in rec.messages:
            parts = str(m.get("content", "")).split(PLACEHOLDER)
            text = parts[0]
            for part in parts[1:]:
                text += start + image * self.processor.num_tokens(next(grids)) + end + part
            if rec.videos:
                parts = text.split(VIDEO_PLACEHOLDER)
                text = parts[0]
                for part in parts[1:]:
                    _, grid, times = next(plans)
                    text += self.video_processor.prompt(grid, times, self.video_token, start, end) + part
            messages.append({**m, "content": text})
        ids, mask = self.encoder.encode(messages)
        if len(ids) - 1 > self.seq_length:
            raise DataError(f"{rec.where}: the conversation has {len(ids)} tokens with its image tokens, more than "
                            f"train.seq_length + 1 = {self.seq_length + 1} (raise it or lower max_pixels)")
        if mask[1:].sum() == 0:
            raise DataError(f"{rec.where}: no token carries loss (no assistant answer)")
        return ids, mask

    def __len__(self) -> int:
        return len(self.bins)

    def _images(self, rec: Record):
        pixels, grids = [], []
        for path in rec.images:
            try:
                p, g = self.processor(_open(path))
            except DataError as exc:
                raise DataError(f"{rec.where}: {exc}") from None
            pixels.append(p)
            grids.append(g)
        return pixels, grids

    def _videos(self, rec: Record):
        from loongforge_vlm.data.video import decode

        pixels, grids = [], []
        for path, (indices, grid, _) in zip(rec.videos, rec.video_plans, strict=True):
            try:
                pixels.append(self.video_processor.patches(decode(path, indices), grid))
            except DataError as exc:
                raise DataError(f"{rec.where}: {exc}") from None
            grids.append(grid)
        return pixels, grids

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, p = self.seq_length, self.processor
        tokens = torch.full((s,), self.pad_id, dtype=torch.long)
        labels = torch.full((s,), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(s, dtype=torch.float32)
        position_ids = torch.zeros(s, dtype=torch.long)
        mrope = torch.zeros(3, s, dtype=torch.long)
        segment_ids = torch.zeros(s, dtype=torch.long)
        pixels, grids, vpixels, vgrids = [], [], [], []
        at = 0
        for seg, r in enumerate(self.bins[int(i)]):
            rec, ids, mask = self.records[r]
            n = len(ids) - 1
            ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            tokens[at:at + n], labels[at:at + n] = ids[:-1], ids[1:]
            loss_mask[at:at + n] = torch.from_numpy(np.asarray(mask[1:], dtype=np.float32))
            rec_pixels, rec_grids = self._images(rec)
            rec_vpixels, rec_vgrids = self._videos(rec) if rec.videos else ([], [])
            position_ids[at:at + n] = torch.arange(n)
            mrope[:, at:at + n] = (mrope_positions(ids[:-1], rec_grids, self.image_token_id, p.merge_size,
                                                   video_token_id=self.video_token_id, video_grid_thw=rec_vgrids)
                                   if isinstance(p, Qwen2_5ImageProcessor) else torch.arange(n))
            vpixels += rec_vpixels
            vgrids += rec_vgrids
            segment_ids[at:at + n] = seg
            pixels += rec_pixels
            grids += rec_grids
            at += n
        if at < s:  # padding: continues the last conversation's positions; its own segment
            position_ids[at:] = position_ids[at - 1] + 1 + torch.arange(s - at)
            mrope[:, at:] = mrope[:, at - 1].max() + 1 + torch.arange(s - at)
            segment_ids[at:] = segment_ids[at - 1] + 1
        out = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "mrope_position_ids": mrope,
            "pixel_values": torch.cat(pixels) if pixels else p.empty_pixels(),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long).view(-1, 3),
        }
        if self.video_processor is not None:
            out["pixel_values_videos"] = torch.cat(vpixels) if vpixels else self.video_processor.empty_pixels()
            out["video_grid_thw"] = torch.tensor(vgrids, dtype=torch.long).view(-1, 3)
        if self.pack:
            out["segment_ids"] = segment_ids
        return out


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k not in IMAGE_KEYS}
    for k in IMAGE_KEYS:
        if k in samples[0]:
            out[k] = torch.cat([s[k] for s in samples])
    return out
