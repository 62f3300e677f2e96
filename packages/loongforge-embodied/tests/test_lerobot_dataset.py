"""The LeRobotDataset v3.0 reader on the synthetic reaching dataset, and its bad-input errors."""

import json

import av
import numpy as np
import pytest
import torch
from loongforge.config import ConfigError
from loongforge_embodied.data.lerobot_v3 import LeRobotV3Dataset
from loongforge_embodied.data.synthetic import CAMERAS, _write_video, write_reaching_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_reaching_dataset(tmp_path_factory.mktemp("reach"), episodes=3, length=12, image_size=32)


def all_frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_reads_frames_chunks_and_stats(root):
    ds = LeRobotV3Dataset(root, chunk_size=5)
    assert len(ds) == 36 and ds.cameras == list(CAMERAS) and (ds.state_dim, ds.action_dim) == (2, 2)
    s = ds[12 + 9]                                          # episode 1, frame 9 of 12
    assert (s["episode_index"], s["frame_index"]) == (1, 9)
    assert s["images"].shape == (2, 3, 32, 32) and s["images"].dtype == torch.uint8
    # the frame comes from the right place of the concatenated mp4 (episode 1 starts at 1.2 s)
    video = all_frames(root / f"videos/{CAMERAS[0]}/chunk-000/file-000.mp4")
    assert np.array_equal(s["images"][0].permute(1, 2, 0).numpy(), video[21])
    # chunk of 5 from frame 9 of 12: three real steps, then the last action repeated, masked out
    assert s["action_valid"].tolist() == [True, True, True, False, False]
    assert torch.equal(s["actions"][3], s["actions"][2]) and torch.equal(s["actions"][4], s["actions"][2])
    # quantile normalisation with the dataset's stats: q01 -> -1, q99 -> +1
    stats = json.loads((root / "meta/stats.json").read_text())["action"]
    raw = ds.action[21:24]
    want = (raw - np.array(stats["q01"])) / (np.array(stats["q99"]) - np.array(stats["q01"])) * 2 - 1
    assert np.allclose(s["actions"][:3].numpy(), want, atol=1e-6)
    assert np.allclose(ds.normalize_action.inverse(s["actions"][:3].numpy()), raw, atol=1e-6)
    # the blue agent dot sits where the state says it is
    img = s["images"][0].permute(1, 2, 0).numpy().astype(int)
    ys, xs = np.nonzero((img[..., 2] > 150) & (img[..., 0] < 100))
    assert np.allclose([xs.mean() / 31, ys.mean() / 31], ds.state[21], atol=0.06)


def test_camera_subset_and_missing_camera(root):
    assert LeRobotV3Dataset(root, chunk_size=2, cameras=[CAMERAS[1]])[0]["images"].shape[0] == 1
    with pytest.raises(ConfigError, match=r"vla\.data\.cameras.*observation\.images\.side"):
        LeRobotV3Dataset(root, cameras=["observation.images.side"])


def test_video_shorter_than_episode_names_episode_and_camera(tmp_path):
    root = write_reaching_dataset(tmp_path / "short", episodes=2, length=10, image_size=16)
    path = root / f"videos/{CAMERAS[1]}/chunk-000/file-000.mp4"
    _write_video(path, all_frames(path)[:15], fps=10)          # episode 1 loses 5 of its 10 frames
    ds = LeRobotV3Dataset(root, chunk_size=2)
    ds[3]                                                      # episode 0 is intact
    with pytest.raises(ConfigError, match=r"episode 1 has 10 data rows but its video for camera "
                                          r"'observation\.images\.wrist' holds only 5 frames"):
        ds[13]


def test_bad_metadata(tmp_path):
    root = write_reaching_dataset(tmp_path / "bad", episodes=1, length=4, image_size=16)
    with pytest.raises(ConfigError, match=r"no feature 'observation\.joints'"):
        LeRobotV3Dataset(root, state_key="observation.joints")
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"info\.json: codebase_version 'v2\.1'"):
        LeRobotV3Dataset(root)
    with pytest.raises(ConfigError, match=r"not found"):
        LeRobotV3Dataset(tmp_path / "nowhere")
