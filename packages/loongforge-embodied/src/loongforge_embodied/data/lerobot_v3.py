"""Reader of LeRobotDataset v3.0 directories (pyarrow + PyAV; lerobot itself is not needed).

Layout read (as lerobot 0.6 writes it): ``meta/info.json`` (fps, features, path templates),
``meta/stats.json`` (normalisation statistics), ``meta/tasks.parquet`` (``task`` -> ``task_index``),
``meta/episodes/chunk-*/file-*.parquet`` (per episode: frame range ``dataset_from_index``..
``dataset_to_index``, its data file, and per camera its video file and ``from_timestamp``), the
data parquet files (one row per frame) and one mp4 per camera and file (episodes concatenated).

A sample is one frame with an action chunk: the actions of frames ``i .. i + chunk - 1`` of the
same episode; past the episode end the last action repeats and ``action_valid`` is False there
(lerobot's ``action_is_pad``, inverted). Frames are decoded one episode at a time and the decoded
episodes of the last few requests are cached per worker.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from loongforge.config import ConfigError


@dataclass(frozen=True)
class Normalizer:
    """``mode``: ``quantiles`` (q01/q99 -> [-1, 1], Pi0.5's choice), ``mean_std``, ``min_max`` or ``identity``."""

    mode: str
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def from_stats(cls, stats: dict, key: str, mode: str, where: str) -> Normalizer:
        need = {"quantiles": ("q01", "q99"), "mean_std": ("mean", "std"), "min_max": ("min", "max")}
        if mode == "identity":
            return cls(mode, np.zeros(1, np.float32), np.ones(1, np.float32))
        if mode not in need:
            raise ConfigError(f"config key 'vla.data.normalization': unknown mode {mode!r} "
                              f"(quantiles, mean_std, min_max, identity)")
        s = stats.get(key)
        if s is None or any(n not in s for n in need[mode]):
            raise ConfigError(f"{where}: no '{'/'.join(need[mode])}' statistics for '{key}' "
                              f"(needed by normalization mode {mode!r})")
        lo, hi = (np.asarray(s[n], np.float32).reshape(-1) for n in need[mode])
        return cls(mode, lo, hi)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "identity":
            return x
        if self.mode == "mean_std":
            return (x - self.a) / (self.b + 1e-8)
        d = np.where(self.b - self.a == 0, 1e-8, self.b - self.a)
        return (x - self.a) / d * 2.0 - 1.0

    def inverse(self, x):
        if self.mode == "identity":
            return x
        if self.mode == "mean_std":
            return x * (self.b + 1e-8) + self.a
        d = np.where(self.b - self.a == 0, 1e-8, self.b - self.a)
        return (x + 1.0) * d / 2.0 + self.a


class LeRobotV3Dataset(torch.utils.data.Dataset):
    """Map-style dataset of frames with action chunks.

    ``sample = {"images": uint8 [ncam, 3, H, W], "state": float32 [state_dim] (normalised),
    "actions": float32 [chunk, action_dim] (normalised), "action_valid": bool [chunk],
    "task": str, "episode_index": int, "frame_index": int}``
    """

    def __init__(self, root: str | Path, *, chunk_size: int = 50, cameras: list[str] | None = None,
                 state_key: str = "observation.state", action_key: str = "action",
                 normalization: str = "quantiles", episodes: list[int] | None = None, cache_episodes: int = 16):
        self.root = Path(root)
        self.chunk_size = chunk_size
        info_path = self.root / "meta/info.json"
        if not info_path.is_file():
            raise ConfigError(f"{info_path}: not found (is 'vla.data.root' a LeRobotDataset v3.0 directory?)")
        self.info = json.loads(info_path.read_text())
        ver = str(self.info.get("codebase_version", ""))
        if not ver.startswith("v3"):
            raise ConfigError(f"{info_path}: codebase_version {ver!r}; this reader reads v3.x datasets")
        self.fps = float(self.info["fps"])
        feats = self.info["features"]
        for key in (state_key, action_key):
            if key not in feats:
                raise ConfigError(f"{info_path}: no feature {key!r} (features: {', '.join(feats)})")
        self.state_key, self.action_key = state_key, action_key
        self.state_dim = int(np.prod(feats[state_key]["shape"]))
        self.action_dim = int(np.prod(feats[action_key]["shape"]))
        videos = [k for k, f in feats.items() if f.get("dtype") == "video"]
        self.cameras = list(cameras) if cameras is not None else videos
        for k in self.cameras:
            if k not in videos:
                raise ConfigError(f"config key 'vla.data.cameras': camera {k!r} is not a video feature of "
                                  f"{info_path} (video features: {', '.join(videos) or 'none'})")
        stats_path = self.root / "meta/stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        self.normalize_state = Normalizer.from_stats(stats, state_key, normalization, str(stats_path))
        self.normalize_action = Normalizer.from_stats(stats, action_key, normalization, str(stats_path))

        tasks = pq.read_table(self.root / "meta/tasks.parquet").to_pydict()
        names = tasks.get("task", tasks.get("__index_level_0__"))
        self.tasks = dict(zip(tasks["task_index"], names, strict=True))

        eps = []
        for f in sorted((self.root / "meta/episodes").glob("chunk-*/file-*.parquet")):
            eps += pq.read_table(f).to_pylist()
        if not eps:
            raise ConfigError(f"{self.root / 'meta/episodes'}: no episode parquet files")
        self.episodes = {int(e["episode_index"]): e for e in eps}
        if episodes is not None:
            missing = sorted(set(episodes) - set(self.episodes))
            if missing:
                raise ConfigError(f"config key 'vla.data.episodes': episodes {missing} not in {self.root}")
            self.episodes = {e: self.episodes[e] for e in episodes}
        for e, ep in self.episodes.items():
            for k in self.cameras:
                if f"videos/{k}/from_timestamp" not in ep:
                    raise ConfigError(f"{self.root}/meta/episodes: episode {e} has no video for camera {k!r}")
        self._load_frames()
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_episodes

    # -- tabular data -------------------------------------------------------------------------
    def _load_frames(self):
        files = sorted({(int(ep["data/chunk_index"]), int(ep["data/file_index"])) for ep in self.episodes.values()})
        cols = [self.state_key, self.action_key, "episode_index", "frame_index", "index", "task_index"]
        parts = []
        for c, f in files:
            path = self.root / self.info["data_path"].format(chunk_index=c, file_index=f)
            t = pq.read_table(path)
            missing = [k for k in cols if k not in t.column_names]
            if missing:
                raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
            parts.append((path, t.select(cols)))
        state = np.concatenate([np.asarray(t.column(self.state_key).to_pylist(), np.float32) for _, t in parts])
        action = np.concatenate([np.asarray(t.column(self.action_key).to_pylist(), np.float32) for _, t in parts])
        index = np.concatenate([t.column("index").to_numpy() for _, t in parts])
        order = np.argsort(index)
        self.index = index[order]
        self.state = state.reshape(len(state), -1)[order]
        self.action = action.reshape(len(action), -1)[order]
        self.episode = np.concatenate([t.column("episode_index").to_numpy() for _, t in parts])[order]
        self.frame = np.concatenate([t.column("frame_index").to_numpy() for _, t in parts])[order]
        self.task_index = np.concatenate([t.column("task_index").to_numpy() for _, t in parts])[order]
        if self.state.shape[1] != self.state_dim or self.action.shape[1] != self.action_dim:
            raise ConfigError(f"{parts[0][0]}: state/action width {self.state.shape[1]}/{self.action.shape[1]} "
                              f"!= info.json's {self.state_dim}/{self.action_dim}")
        keep = np.isin(self.episode, list(self.episodes))
        self.rows = np.nonzero(keep)[0]
        self._pos = {int(g): i for i, g in enumerate(self.index)}
        for e, ep in self.episodes.items():
            n = int(ep["dataset_to_index"]) - int(ep["dataset_from_index"])
            got = int((self.episode == e).sum())
            if got != n:
                raise ConfigError(f"{self.root}: episode {e} has {got} data rows but meta/episodes says {n}")

    def __len__(self) -> int:
        return len(self.rows)

    # -- video ----------------------------------------------------------------------------------
    def _video_path(self, ep: dict, key: str) -> Path:
        return self.root / self.info["video_path"].format(
            video_key=key, chunk_index=int(ep[f"videos/{key}/chunk_index"]), file_index=int(ep[f"videos/{key}/file_index"]))

    def episode_frames(self, e: int, key: str) -> np.ndarray:
        """All frames of episode ``e`` from camera ``key``: uint8 [length, H, W, 3]."""
        if (e, key) in self._cache:
            self._cache.move_to_end((e, key))
            return self._cache[(e, key)]
        import av

        ep = self.episodes[e]
        n = int(ep["dataset_to_index"]) - int(ep["dataset_from_index"])
        path = self._video_path(ep, key)
        if not path.is_file():
            raise ConfigError(f"{path}: video of camera {key!r} for episode {e} not found")
        t0, t1 = float(ep[f"videos/{key}/from_timestamp"]), float(ep[f"videos/{key}/to_timestamp"])
        half = 0.5 / self.fps
        frames = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(max(t0 - half, 0) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                ts = float(frame.time)
                if ts < t0 - half:
                    continue
                if ts >= min(t1, t0 + n / self.fps) - half or len(frames) == n:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
        if len(frames) < n:
            raise ConfigError(f"{path}: episode {e} has {n} data rows but its video for camera {key!r} "
                              f"holds only {len(frames)} frames in [{t0:.3f}, {t1:.3f}) s")
        out = np.stack(frames)
        self._cache[(e, key)] = out
        while len(self._cache) > self._cache_size * max(len(self.cameras), 1):
            self._cache.popitem(last=False)
        return out

    # -- samples ----------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        e, f = int(self.episode[row]), int(self.frame[row])
        ep = self.episodes[e]
        end = self._pos[int(ep["dataset_to_index"]) - 1]
        idx = np.minimum(np.arange(row, row + self.chunk_size), end)
        images = np.stack([self.episode_frames(e, k)[f] for k in self.cameras]) if self.cameras else \
            np.zeros((0, 3, 1, 1), np.uint8)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) if self.cameras
            else torch.from_numpy(images),
            "state": torch.from_numpy(self.normalize_state(self.state[row]).astype(np.float32)),
            "actions": torch.from_numpy(self.normalize_action(self.action[idx]).astype(np.float32)),
            "action_valid": torch.from_numpy(np.arange(row, row + self.chunk_size) <= end),
            "task": self.tasks.get(int(self.task_index[row]), ""),
            "episode_index": e, "frame_index": f,
        }
