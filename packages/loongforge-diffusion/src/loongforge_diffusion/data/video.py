"""Video + caption manifests and the dataset that decodes them (PyAV; its wheels bundle FFmpeg).

A manifest is a ``.jsonl`` file (one JSON object a line) or a ``.parquet`` table with a video
column (a path, relative to the manifest's folder unless absolute) and a caption column; the names
are config keys (``diffusion.video_field`` / ``diffusion.caption_field``). Each item:

* decodes ``num_frames`` frames ``frame_stride`` apart from the start of the clip;
* picks the bucket ``(height, width)`` whose aspect ratio is closest to the clip's, resizes the
  clip to cover it (bilinear, antialiased) and centre-crops it;
* returns ``{"video": float [3, F, H, W] in [-1, 1], "caption": str, "source": path}``.

Problems name the file (and line): a missing column fails when the manifest is read, a video that
cannot be decoded or has too few frames raises :class:`VideoError` when the item is read (the
preprocessor skips and counts it under ``data.on_error: skip``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loongforge.config import ConfigError
from loongforge.data.errors import DataError


class VideoError(DataError):
    """One video cannot be used (unreadable, corrupt, too short); the message names the file."""


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str
    where: str  # "manifest.jsonl:3" for messages


def read_manifest(path: str | Path, video_field: str = "video", caption_field: str = "caption") -> list[Clip]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for field in (video_field, caption_field):
            if field not in table.column_names:
                raise DataError(f"{path}: no column {field!r} (columns: {table.column_names}; config key "
                                f"'diffusion.{'video' if field == video_field else 'caption'}_field')")
        rows = [(f"{path}:row {i}", r) for i, r in enumerate(table.select([video_field, caption_field]).to_pylist())]
    elif path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    else:
        raise DataError(f"{path}: a manifest must be .jsonl or .parquet")
    clips = []
    for where, row in rows:
        for field, key in ((video_field, "video_field"), (caption_field, "caption_field")):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{where}: missing or non-string {field!r} (config key 'diffusion.{key}')")
        video = Path(row[video_field])
        clips.append(Clip(video if video.is_absolute() else path.parent / video, row[caption_field], where))
    if not clips:
        raise DataError(f"{path}: the manifest has no rows")
    return clips


def decode_frames(path: Path, num_frames: int, stride: int = 1) -> np.ndarray:
    """``[num_frames, H, W, 3]`` uint8 RGB frames ``stride`` apart from the first."""
    import av

    need = (num_frames - 1) * stride + 1
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            for i, frame in enumerate(container.decode(video=0)):
                if i % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i + 1 >= need:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{path}: cannot decode the video ({type(exc).__name__}: {exc})") from exc
    if len(frames) < num_frames:
        raise VideoError(f"{path}: too few frames: needs {need} (diffusion.num_frames={num_frames}, "
                         f"frame_stride={stride}), the video has {len(frames) * stride if frames else 0} or fewer")
    return np.stack(frames[:num_frames])


def pick_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    ratio = height / width
    return min((tuple(b) for b in buckets), key=lambda b: abs(np.log(b[0] / b[1]) - np.log(ratio)))


def resize_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[F, 3, H, W]`` float -> ``[F, 3, *size]``: resize to cover, then centre crop."""
    h, w = frames.shape[-2:]
    bh, bw = size
    scale = max(bh / h, bw / w)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - bh) // 2, (nw - bw) // 2
    return frames[..., top:top + bh, left:left + bw]


def check_buckets(buckets, multiple: int) -> None:
    """Each bucket's height and width must be divisible by VAE compression x patch size."""
    if not buckets:
        raise ConfigError("config key 'diffusion.buckets': give at least one [height, width]")
    for b in buckets:
        if len(b) != 2 or any(int(x) % multiple for x in b):
            raise ConfigError(f"config key 'diffusion.buckets': {list(b)} is not divisible by {multiple} "
                            "(VAE spatial compression x patch size)")


class VideoCaptionDataset(torch.utils.data.Dataset):
    def __init__(self, manifests, *, num_frames: int, buckets, frame_stride: int = 1,
                 video_field: str = "video", caption_field: str = "caption"):
        self.clips = [c for m in manifests for c in read_manifest(m, video_field, caption_field)]
        self.num_frames, self.stride, self.buckets = num_frames, frame_stride, [tuple(b) for b in buckets]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        if not clip.video.is_file():
            raise VideoError(f"{clip.video}: file not found (from {clip.where})")
        frames = decode_frames(clip.video, self.num_frames, self.stride)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, H, W]
        x = resize_crop(x, pick_bucket(x.shape[-2], x.shape[-1], self.buckets))
        return {"video": x.permute(1, 0, 2, 3).contiguous(), "caption": clip.caption, "source": str(clip.video)}
