"""From a checked ``Record`` to a model sample: placeholders expanded to the layout's vision tokens
(images: start + one token per LLM image token + end; videos: the video processor's timestamped
frames), the chat template with loss on the answers, the media preprocessed, and the positions
(plain and multimodal-RoPE) of each conversation in a row."""

from __future__ import annotations

import numpy as np
import torch
from loongforge.data.errors import DataError
from loongforge.data.sft import ChatEncoder
from loongforge.data.tokenizer import pad_token_id

from loongforge_vlm.data.positions import mrope_positions
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor
from loongforge_vlm.data.records import PLACEHOLDER, VIDEO_PLACEHOLDER, Record, open_image


class SampleBuilder:
    def __init__(self, tokenizer, processor, *, seq_length: int, image_token: str, vision_start: str,
                 vision_end: str, chat_template: str = "chatml", loss_on: str = "assistant",
                 video_processor=None, video_token: str = ""):
        self.processor, self.seq_length = processor, seq_length
        self.video_processor, self.video_token = video_processor, video_token
        if video_processor is not None and not video_token:
            raise ValueError("a video processor needs the layout's video token (VLMLayout.video_token)")
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if video_processor is not None else None
        self.encoder = ChatEncoder(tokenizer, chat_template, loss_on)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.pad_id = pad_token_id(tokenizer)
        self.tokens = (image_token, vision_start, vision_end)

    def encode(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
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

    def _images(self, rec: Record):
        pixels, grids = [], []
        for path in rec.images:
            try:
                p, g = self.processor(open_image(path))
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

    def row(self, items: list[tuple[Record, np.ndarray, np.ndarray]], segments: bool = False) -> dict[str, torch.Tensor]:
        """One model sample of the conversations ``items`` ((record, ids, mask), packed in order)."""
        s, p = self.seq_length, self.processor
        tokens = torch.full((s,), self.pad_id, dtype=torch.long)
        labels = torch.full((s,), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(s, dtype=torch.float32)
        position_ids = torch.zeros(s, dtype=torch.long)
        mrope = torch.zeros(3, s, dtype=torch.long)
        segment_ids = torch.zeros(s, dtype=torch.long)
        pixels, grids, vpixels, vgrids = [], [], [], []
        at = 0
        for seg, (rec, ids, mask) in enumerate(items):
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
        if segments:
            out["segment_ids"] = segment_ids
        return out
