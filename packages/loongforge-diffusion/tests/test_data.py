"""Synthetic video set, manifest dataset (PyAV), bad input, preprocessing to latent shards."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from loongforge.config import ConfigError
from loongforge.data.errors import DataError
from loongforge_diffusion.data.encoders import Encoders
from loongforge_diffusion.data.latents import LatentDataset, preprocess
from loongforge_diffusion.data.synthetic import write_moving_shapes
from loongforge_diffusion.data.video import VideoCaptionDataset, VideoError, check_buckets, decode_frames
from loongforge_diffusion.wan.config import WanConfig


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_moving_shapes(tmp_path_factory.mktemp("shapes"), n=4, frames=9, height=48, width=64)


def test_synthetic_set_is_deterministic(clips, tmp_path):
    again = write_moving_shapes(tmp_path, n=4, frames=9, height=48, width=64)
    assert clips.read_text() == again.read_text()
    rows = [json.loads(line) for line in clips.read_text().splitlines()]
    assert len(rows) == 4 and all("moving" in r["caption"] for r in rows)
    a = decode_frames(clips.parent / rows[0]["video"], 9)
    b = decode_frames(again.parent / rows[0]["video"], 9)
    assert a.shape == (9, 48, 64, 3) and np.array_equal(a, b)
    assert np.abs(a[0].astype(int) - a[-1].astype(int)).sum() > 0  # the shape moves


def test_dataset_buckets_and_range(clips):
    ds = VideoCaptionDataset([clips], num_frames=5, frame_stride=2, buckets=[[32, 32], [32, 48]])
    item = ds[0]
    assert item["video"].shape == (3, 5, 32, 48)  # 48x64 is closest to 32x48 (aspect 0.75 vs 0.67)
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    assert item["caption"].startswith("a ")


def test_parquet_manifest(clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in clips.read_text().splitlines()]
    path = clips.parent / "m.parquet"
    pq.write_table(pa.table({"path": [r["video"] for r in rows], "text": [r["caption"] for r in rows]}), path)
    ds = VideoCaptionDataset([path], num_frames=9, buckets=[[48, 64]], video_field="path", caption_field="text")
    assert len(ds) == 4 and ds[3]["caption"] == rows[3]["caption"]
    with pytest.raises(DataError, match="m.parquet: no column 'caption'.*diffusion.caption_field"):
        VideoCaptionDataset([path], num_frames=9, buckets=[[48, 64]], video_field="path")


def test_bad_inputs_name_the_file(clips, tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"video": str(clips.parent / "clip_00000.mp4")}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:1: missing or non-string 'caption'"):
        VideoCaptionDataset([bad], num_frames=9, buckets=[[48, 64]])
    ds = VideoCaptionDataset([clips], num_frames=10, buckets=[[48, 64]])
    with pytest.raises(VideoError, match=r"clip_00000.mp4: too few frames"):
        ds[0]
    with pytest.raises(ConfigError, match=r"diffusion.buckets.*\[40, 64\].*16"):
        check_buckets([[48, 64], [40, 64]], 16)


def _encoders(wan):
    d = SimpleNamespace(vae="tiny", text_encoder="tiny", encoder_seed=0)
    return Encoders.build(d, wan)


def test_preprocess_skips_and_counts_corrupt_videos(clips, tmp_path):
    corrupt = clips.parent / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    manifest = clips.parent / "with_corrupt.jsonl"
    manifest.write_text(clips.read_text() + json.dumps({"video": str(corrupt), "caption": "broken"}) + "\n")
    wan = WanConfig(in_channels=8, text_dim=32, text_len=16, num_attention_heads=2, attention_head_dim=12)
    enc = _encoders(wan)
    ds = VideoCaptionDataset([manifest], num_frames=9, buckets=[[48, 64]])
    with pytest.raises(VideoError, match="corrupt.mp4: cannot decode"):
        preprocess(ds, enc, tmp_path / "raise", on_error="raise")
    index = preprocess(ds, enc, tmp_path / "lat", shard_size=3, on_error="skip", log=lambda m: None)
    assert index["num_samples"] == 4 and index["num_skipped"] == 1 and "corrupt.mp4" in index["skipped"][0]["error"]
    lat = LatentDataset(tmp_path / "lat")
    assert len(lat) == 4 and sorted(p.name for p in (tmp_path / "lat").glob("shard-*")) == [
        "shard-00000.safetensors", "shard-00001.safetensors"]
    item = lat[3]
    assert item["latent"].shape == (8, 3, 6, 8)  # 9 frames -> 1 + 8/4; 48x64 / 8
    assert item["text"].shape == (16, 32) and lat.null_text.abs().sum() == 0
    # latents equal a fresh encoding of the same clip; saved encoders reload to the same mapping
    again = Encoders.load(tmp_path / "lat" / "encoders", 16)
    assert torch.allclose(again.encode_video(ds[3]["video"][None])[0], item["latent"], atol=1e-5)
    assert torch.allclose(again.encode_text([ds[3]["caption"]])[0], item["text"], atol=1e-5)
    assert again.decode_latents(item["latent"][None]).shape == (1, 3, 9, 48, 64)
