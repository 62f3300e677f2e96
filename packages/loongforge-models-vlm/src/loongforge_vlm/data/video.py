"""Video input for Qwen3-VL: frames decoded with PyAV, sampled at a configured rate, resized and cut
into patches as Qwen3-VL's video processor does, plus the frame timestamps its prompt carries.

Sampling (``Qwen3VLVideoProcessor.sample_frames``): ``n = int(total / video_fps * fps)`` frames,
clamped to ``[min_frames, max_frames]`` and to the frames there are, at ``linspace(0, total - 1, n)``
rounded. Sizing (``smart_resize``): one size for all frames, sides multiples of
``patch_size * merge_size``, with ``frames * h * w`` in ``[min_pixels, max_pixels]``. Frames are padded
to a multiple of ``temporal_patch_size`` by repeating the last; each pair of frames is one temporal
patch, so a clip of ``n`` frames has grid ``(ceil(n / 2), h / P, w / P)``.

Prompt: the clip becomes, per temporal patch, ``<{t:.1f} seconds>`` + vision_start +
``h * w / (P * merge)^2`` video tokens + vision_end, where ``t`` is the mean time of the patch's first
and last frame (``Qwen3VLProcessor._calculate_timestamps``). In the LLM each frame's tokens get the
multimodal-RoPE positions of a still image placed at that point of the text
(:func:`loongforge_vlm.data.positions.mrope_positions` with ``video_grid_thw``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loongforge.data.errors import DataError


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames in the stream
    fps: float
    height: int
    width: int


def _open(media):
    """``av.open`` of a path or an in-memory ``records.Member``."""
    import av

    from loongforge_vlm.data.records import Member, source

    return av.open(source(media) if isinstance(media, Member) else str(media))


def probe(path) -> VideoInfo:
    """Frame count, rate and size of the first video stream (demuxes, does not decode).
    ``path``: a file path or a ``records.Member``."""
    import av

    try:
        with _open(path) as container:
            if not container.streams.video:
                raise DataError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or None
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            height, width = stream.codec_context.height, stream.codec_context.width
    except FileNotFoundError:
        raise DataError(f"video not found: {path}") from None
    except av.error.FFmpegError as exc:
        raise DataError(f"video {path} cannot be read: {exc}") from None
    if total < 1:
        raise DataError(f"video {path} has no frames")
    return VideoInfo(total, fps or 24.0, height, width)


def decode(path, indices: list[int]) -> np.ndarray:
    """The frames at ``indices`` (sorted, repeats allowed) as uint8 [n, H, W, 3] RGB."""
    import av

    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    try:
        with _open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
    except av.error.FFmpegError as exc:
        raise DataError(f"video {path} cannot be decoded: {exc}") from None
    missing = [i for i in wanted if i not in got]
    if missing:
        raise DataError(f"video {path}: frames {missing[:5]} could not be decoded")
    return np.stack([got[i] for i in indices])


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """uint8 RGB frames [n, H, W, 3] as a lossless (FFV1) video file, e.g. ``.mkv`` (samples, tests)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def smart_resize(frames: int, height: int, width: int, *, temporal: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video size rule (``frames * h * w`` within the pixel budget)."""
    if frames < temporal:
        raise DataError(f"a video needs at least {temporal} frames, got {frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"aspect ratio {max(height, width) / min(height, width):.0f} is larger than 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class Qwen3VideoProcessor:
    """Configured by ``model.image_encoder.video_*`` keys (defaults: Qwen3-VL's video processor)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 768 * 32 * 32
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_encoder_section(cls, section) -> Qwen3VideoProcessor:
        s = {k: v for k, v in dict(section).items() if v is not None}
        kw = {"patch_size": s.get("patch_size", 16), "temporal_patch_size": s.get("temporal_patch_size", 2),
              "merge_size": s.get("spatial_merge_size", 2)}
        for ours in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels"):
            if f"video_{ours}" in s:
                kw[ours] = type(getattr(cls, ours))(s[f"video_{ours}"])
        for key in ("image_mean", "image_std"):
            if key in s:
                kw[key] = tuple(float(x) for x in s[key])
        return cls(**kw)

    def sample(self, info: VideoInfo) -> list[int]:
        n = int(info.frames / info.fps * self.fps)
        n = min(max(n, self.min_frames), self.max_frames, info.frames)
        return np.linspace(0, info.frames - 1, n).round().astype(int).tolist()

    def plan(self, info: VideoInfo) -> tuple[list[int], tuple[int, int, int]]:
        """Sampled frame indices and the clip's grid (t, h, w) in patches, from the metadata alone."""
        indices = self.sample(info)
        h, w = smart_resize(len(indices), info.height, info.width, temporal=self.temporal_patch_size,
                            factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        t = -(-len(indices) // self.temporal_patch_size)
        return indices, (t, h // self.patch_size, w // self.patch_size)

    def timestamps(self, indices: list[int], fps: float) -> list[float]:
        """Seconds of each temporal patch: the mean of its first and last frame's time."""
        m = self.temporal_patch_size
        idx = list(indices) + [indices[-1]] * (-len(indices) % m)
        return [(idx[i] / fps + idx[i + m - 1] / fps) / 2 for i in range(0, len(idx), m)]

    def num_tokens(self, grid_thw) -> int:
        t, h, w = grid_thw
        return t * h * w // self.merge_size ** 2

    def prompt(self, grid_thw, times: list[float], video_token: str, start: str, end: str) -> str:
        per_frame = self.num_tokens((1, *grid_thw[1:]))
        return "".join(f"<{t:.1f} seconds>{start}{video_token * per_frame}{end}" for t in times)

    def patches(self, frames: np.ndarray, grid_thw) -> torch.Tensor:
        """uint8 frames [n, H, W, 3] -> [t * h * w, C * T * P * P] in the encoder's patch order."""
        from PIL import Image

        t, gh, gw = grid_thw
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w = gh * p, gw * p
        x = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
                      if f.shape[:2] != (h, w) else f.astype(np.float32) for f in frames])
        x = x.transpose(0, 3, 1, 2) / 255.0  # [n, C, h, w]
        x = (x - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(self.image_std, np.float32)[:, None, None]
        if pad := -len(x) % tp:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
        c = x.shape[1]
        x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return torch.from_numpy(np.ascontiguousarray(x).reshape(t * gh * gw, c * tp * p * p))

    def __call__(self, path: Path) -> tuple[torch.Tensor, tuple[int, int, int], list[float]]:
        """(patches, grid (t, h, w), timestamps in seconds) of the video file ``path``."""
        info = probe(path)
        indices, grid = self.plan(info)
        return self.patches(decode(path, indices), grid), grid, self.timestamps(indices, info.fps)

    def empty_pixels(self) -> torch.Tensor:
        return torch.zeros(0, 3 * self.temporal_patch_size * self.patch_size ** 2)
