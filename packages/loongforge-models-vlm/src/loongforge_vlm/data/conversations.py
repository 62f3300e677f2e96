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

import torch
from loongforge.data.errors import DataError
from loongforge.data.sft import pack_best_fit

from loongforge_vlm.data.records import Stats, read_records, skip
from loongforge_vlm.data.samples import SampleBuilder


class VLMConversationDataset(torch.utils.data.Dataset):
    def __init__(self, paths, tokenizer, processor, *, seq_length: int,
                 image_token: str, vision_start: str, vision_end: str, chat_template: str = "chatml",
                 loss_on: str = "assistant", on_error: str = "raise", pack: bool = False, seed: int = 0,
                 video_processor=None, video_token: str = ""):
        self.pack = pack
        self.builder = SampleBuilder(tokenizer, processor, seq_length=seq_length, image_token=image_token,
                                     vision_start=vision_start, vision_end=vision_end, chat_template=chat_template,
                                     loss_on=loss_on, video_processor=video_processor, video_token=video_token)
        self.stats = Stats(packed=pack)
        self.records = []
        for rec in read_records(paths, processor, on_error, self.stats, video_processor):
            try:
                ids, mask = self.builder.encode(rec)
            except DataError as exc:
                if not skip(str(exc), on_error, self.stats):
                    raise
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

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.builder.row([self.records[r] for r in self.bins[int(i)]], segments=self.pack)


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k not in IMAGE_KEYS}
    for k in IMAGE_KEYS:
        if k in samples[0]:
            out[k] = torch.cat([s[k] for s in samples])
    return out
