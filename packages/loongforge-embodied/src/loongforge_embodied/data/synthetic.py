"""A synthetic LeRobotDataset v3.0: a 2D reaching task rendered to small frames.

An agent (blue dot) moves toward a target (red dot) in the unit square; the state is the agent's
position, the action its velocity command (toward the target, clipped, with a little noise), so
a policy must read the target from the image. Two cameras: ``observation.images.top`` (whole
scene) and ``observation.images.wrist`` (a window centred on the agent). Written exactly as
lerobot 0.6 writes v3.0 (all episodes concatenated in one data parquet and one mp4 per camera):
``meta/info.json``, ``meta/stats.json``, ``meta/tasks.parquet``, ``meta/episodes/chunk-000/
file-000.parquet``, ``data/chunk-000/file-000.parquet``, ``videos/<key>/chunk-000/file-000.mp4``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CAMERAS = ("observation.images.top", "observation.images.wrist")
TASK = "reach the red dot"


def _render(agent: np.ndarray, target: np.ndarray, size: int, centre: np.ndarray | None = None,
            zoom: float = 1.0) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    if centre is not None:
        xs, ys = centre[0] + (xs - 0.5) / zoom, centre[1] + (ys - 0.5) / zoom
    img = np.full((size, size, 3), 235, np.uint8)
    for p, colour in ((target, (220, 30, 30)), (agent, (30, 60, 220))):
        img[(xs - p[0]) ** 2 + (ys - p[1]) ** 2 < (0.09 / max(zoom, 1)) ** 2 * (1 + zoom)] = colour
    return img


def _write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = out.add_stream(codec, rate=fps, options={"crf": "18"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _stats(x: np.ndarray) -> dict:
    x = x.reshape(len(x), -1).astype(np.float64)
    q = {f"q{p:02d}": np.quantile(x, p / 100, axis=0).tolist() for p in (1, 10, 50, 90, 99)}
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [len(x)], **q}


def write_reaching_dataset(root: str | Path, episodes: int = 6, length: int = 40, image_size: int = 32,
                           fps: int = 10, seed: int = 0) -> Path:
    """Write the dataset under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    states, actions, ep_idx, frame_idx, ts = [], [], [], [], []
    frames = {k: [] for k in CAMERAS}
    ep_rows = []
    start = 0
    for e in range(episodes):
        agent, target = rng.uniform(0.1, 0.9, 2), rng.uniform(0.1, 0.9, 2)
        for f in range(length):
            act = np.clip((target - agent) * 0.5, -0.1, 0.1) + rng.normal(0, 0.005, 2)
            states.append(agent.copy())
            actions.append(act)
            frames[CAMERAS[0]].append(_render(agent, target, image_size))
            frames[CAMERAS[1]].append(_render(agent, target, image_size, centre=agent, zoom=2.0))
            ep_idx.append(e)
            frame_idx.append(f)
            ts.append(f / fps)
            agent = np.clip(agent + act, 0, 1)
        row = {"episode_index": e, "tasks": [TASK], "length": length, "data/chunk_index": 0, "data/file_index": 0,
               "dataset_from_index": start, "dataset_to_index": start + length,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        for k in CAMERAS:
            row |= {f"videos/{k}/chunk_index": 0, f"videos/{k}/file_index": 0,
                    f"videos/{k}/from_timestamp": start / fps, f"videos/{k}/to_timestamp": (start + length) / fps}
        ep_rows.append(row)
        start += length
    n = start
    states, actions = np.asarray(states, np.float32), np.asarray(actions, np.float32)

    data = pa.table({
        "observation.state": pa.array(list(states), type=pa.list_(pa.float32(), 2)),
        "action": pa.array(list(actions), type=pa.list_(pa.float32(), 2)),
        "timestamp": pa.array(ts, pa.float32()), "frame_index": pa.array(frame_idx, pa.int64()),
        "episode_index": pa.array(ep_idx, pa.int64()), "index": pa.array(np.arange(n), pa.int64()),
        "task_index": pa.array(np.zeros(n, np.int64)),
    })
    (root / "data/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(data, root / "data/chunk-000/file-000.parquet")
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ep_rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task": [TASK], "task_index": pa.array([0], pa.int64())}),
                   root / "meta/tasks.parquet")
    stats = {"observation.state": _stats(states), "action": _stats(actions)}
    for k in CAMERAS:
        video = np.stack(frames[k])
        _write_video(root / f"videos/{k}/chunk-000/file-000.mp4", video, fps)
        s = _stats(video.transpose(0, 3, 1, 2).reshape(n, 3, -1).mean(-1) / 255.0)
        stats[k] = {key: [[[v]] for v in val] if key != "count" else val for key, val in s.items()}
    (root / "meta/stats.json").write_text(json.dumps(stats, indent=2))
    video_feature = {"dtype": "video", "shape": [image_size, image_size, 3], "names": ["height", "width", "channels"],
                     "info": {"video.fps": fps, "video.codec": "h264", "video.pix_fmt": "yuv420p"}}
    info = {
        "codebase_version": "v3.0", "robot_type": "point2d", "total_episodes": episodes, "total_frames": n,
        "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "fps": fps, "splits": {"train": f"0:{episodes}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
            "action": {"dtype": "float32", "shape": [2], "names": ["vx", "vy"]},
            **{k: video_feature for k in CAMERAS},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    return root
