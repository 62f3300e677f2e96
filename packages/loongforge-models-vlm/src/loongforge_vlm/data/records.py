"""Multimodal conversation records: parsing, checking the media, and the counters of a data set.

A record is ``{"messages": [...], "images": [...], "videos": [...]}`` with one ``<image>`` /
``<video>`` placeholder per medium, in order. Media are paths (jsonl files: relative to the file)
or in-memory ``Member`` files (tar shards, :mod:`loongforge_vlm.data.webdataset`); a bad medium
fails naming the record and the file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from loongforge.data.errors import DataError

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


@dataclass(frozen=True)
class Member:
    """A media file held in memory (e.g. a tar-shard member); ``name`` is for messages."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


def source(media):
    """What PIL and PyAV open: the path, or a fresh in-memory file of a ``Member``."""
    return io.BytesIO(media.data) if isinstance(media, Member) else media


def open_image(media):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source(media)) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {media}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image {media} cannot be read: {exc}") from None


def _plan_videos(record: Record, rec: dict, resolve, video_processor) -> None:
    from loongforge_vlm.data.video import probe

    videos = [resolve(p) for p in rec.get("videos") or []]
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


def make_record(rec: dict, where: str, resolve, processor, video_processor=None) -> Record:
    """A checked ``Record`` of one parsed record; ``resolve(name)`` gives a path or a ``Member``.
    Opens each image and probes each video (sizes and frame plans); raises ``DataError``."""
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("record has no 'messages' list")
    images = [resolve(p) for p in rec.get("images") or []]
    placeholders = sum(str(m.get("content", "")).count(PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise DataError(f"{placeholders} {PLACEHOLDER} placeholders but {len(images)} images")
    record = Record(where, messages, images)
    for p in images:
        img = open_image(p)
        record.grids.append(processor.grid(img.height, img.width))
    _plan_videos(record, rec, resolve, video_processor)
    return record


def read_records(paths, processor, on_error: str, stats: Stats, video_processor=None) -> list[Record]:
    """The records of jsonl files (media paths relative to the file)."""
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
                record = make_record(json.loads(line), where, lambda p, d=file.parent: d / p, processor,
                                     video_processor)
            except (DataError, json.JSONDecodeError, ValueError) as exc:
                if not skip(f"{where}: {exc}", on_error, stats):
                    raise DataError(f"{where}: {exc} (set data.on_error=skip to skip such samples)") from None
                continue
            out.append(record)
    return out


def skip(message: str, on_error: str, stats: Stats) -> bool:
    """Count ``message`` as a skipped sample when ``data.on_error=skip``; False: the caller raises."""
    if on_error != "skip":
        return False
    stats.skipped += 1
    stats.errors.append(message)
    return True
