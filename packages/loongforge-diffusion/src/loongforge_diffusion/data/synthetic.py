"""A tiny deterministic video + caption set: coloured shapes moving over a plain background.

``write_moving_shapes(out_dir, n)`` writes ``clip_00000.mp4``... (H.264 through PyAV) and
``manifest.jsonl`` (``{"video": "clip_00000.mp4", "caption": "a red square moving right on a
blue background"}``, paths relative to the manifest). Sample ``i`` depends only on ``(seed, i)``.
The caption names what moves, how and on what, so a text-conditioned model has something to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "white": (235, 235, 235), "black": (20, 20, 20)}
SHAPES = ("square", "circle")
MOTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def render(shape: str, color: str, background: str, motion: str, frames: int, height: int, width: int,
           size: int, start: tuple[int, int]) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = COLORS[background]
    dx, dy = MOTIONS[motion]
    step = max(1, min(height, width) // (2 * frames))
    yy, xx = np.mgrid[0:height, 0:width]
    for f in range(frames):
        cx = (start[0] + dx * step * f) % width
        cy = (start[1] + dy * step * f) % height
        if shape == "square":
            mask = (np.abs(xx - cx) <= size // 2) & (np.abs(yy - cy) <= size // 2)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size // 2) ** 2
        video[f][mask] = COLORS[color]
    return video


def write_mp4(path: str | Path, video: np.ndarray, fps: int = 8) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        stream.thread_count = 1
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_moving_shapes(out_dir: str | Path, n: int = 32, *, frames: int = 17, height: int = 64, width: int = 64,
                        seed: int = 0) -> Path:
    """Write ``n`` clips and ``manifest.jsonl`` into ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        color, background = rng.choice(names, size=2, replace=False)
        shape, motion = SHAPES[rng.integers(len(SHAPES))], list(MOTIONS)[rng.integers(len(MOTIONS))]
        size = int(rng.integers(min(height, width) // 5, min(height, width) // 3))
        start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        video = render(shape, str(color), str(background), motion, frames, height, width, size, start)
        name = f"clip_{i:05d}.mp4"
        write_mp4(out / name, video)
        rows.append({"video": name, "caption": f"a {color} {shape} moving {motion} on a {background} background"})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest
