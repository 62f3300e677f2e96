"""Qwen3-VL video preprocessing: PyAV decoding of a real (lossless) video file, frame sampling,
timestamps and patch layout as transformers' Qwen3-VL processors compute them. (Logits parity with
a video input: ``test_qwen3_vl_parity.py::test_video_logits_match_hf``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge_vlm.data.video import Qwen3VideoProcessor, decode, probe, write_video


def clip(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_decode_sampling_timestamps_and_patches_match_hf(tmp_path):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    frames = clip(30, 64, 96)
    write_video(tmp_path / "v.mkv", frames, fps=10)
    info = probe(tmp_path / "v.mkv")
    assert (info.frames, info.fps, info.height, info.width) == (30, 10.0, 64, 96)

    ours = Qwen3VideoProcessor(fps=2.0, min_pixels=0, max_pixels=10**9)
    hf = Qwen3VLVideoProcessor()
    indices, grid = ours.plan(info)
    ref = hf.sample_frames(VideoMetadata(total_num_frames=30, fps=10.0, width=96, height=64), fps=2.0)
    assert indices == ref.tolist() == [0, 6, 12, 17, 23, 29]
    assert grid == (3, 4, 6)
    decoded = decode(tmp_path / "v.mkv", indices)
    assert np.array_equal(decoded, frames[indices])  # lossless file: the exact frames

    times = ours.timestamps(indices, info.fps)
    assert times == pytest.approx(Qwen3VLProcessor._calculate_timestamps(None, indices, 10.0, 2))
    prompt = ours.prompt(grid, times, "V", "<", ">")
    assert prompt.startswith("<0.3 seconds><" + "V" * 6 + ">") and prompt.count("seconds>") == 3

    patches = ours.patches(decoded, grid)  # no resize: 64x96 is already a multiple of 32
    x = torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.5
    ref_patches, *ref_grid = Qwen3VLVideoProcessor.patchify(None, x[None], patch_size=16, merge_size=2,
                                                            temporal_patch_size=2)
    assert tuple(ref_grid) == grid
    torch.testing.assert_close(patches, ref_patches[0], rtol=0, atol=1e-6)

    # an odd number of frames: the last is repeated to fill the temporal patch
    odd, odd_grid = decode(tmp_path / "v.mkv", [0, 10, 20]), (2, 4, 6)
    assert ours.patches(odd, odd_grid).shape == (2 * 4 * 6, 3 * 2 * 16 * 16)
    assert ours.timestamps([0, 10, 20], 10.0) == pytest.approx([0.5, 2.0])


def test_bad_video_names_the_file(tmp_path):
    from loongforge.data.errors import DataError

    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match="broken.mp4"):
        probe(tmp_path / "broken.mp4")
    with pytest.raises(DataError, match="video not found"):
        probe(tmp_path / "missing.mp4")


def test_conversations_with_video_train_the_model(tmp_path, mcore):
    """A jsonl record with an image and a ``<video>``: the sample carries timestamped frames, the
    mrope positions are HF's ``get_rope_index``, and the collated batch -- through
    ``loongforge_vlm.inputs`` -- gives a loss whose gradients reach the encoder."""
    import json

    from loongforge.config import compose_config
    from loongforge_vlm.data.conversations import VLMConversationDataset, collate
    from loongforge_vlm.data.shapes import shape_image
    from loongforge_vlm.data.tokenizer import load_vision_tokenizer
    from loongforge_vlm.inputs import dataset_kwargs, layout_tokens, model_inputs, resolve_token_ids
    from loongforge_vlm.provider import VLMProvider

    shape_image(64, 64, "red").save(tmp_path / "a.png")
    write_video(tmp_path / "v.mkv", clip(20, 64, 96), fps=10)  # 2 s -> 4 frames -> 2 temporal patches
    record = {"messages": [{"role": "user", "content": "<image> and <video>: what changes?"},
                           {"role": "assistant", "content": "Nothing."}], "images": ["a.png"], "videos": ["v.mkv"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "images": ["a.png"]}) + "\n")

    provider = VLMProvider(compose_config("qwen3_vl_tiny", ["model.image_encoder.video_min_pixels=0"]).model)
    tokenizer = load_vision_tokenizer("builtin:tiny_stories")
    tokenizer.add_tokens([t for t in layout_tokens(provider.layout) if t not in tokenizer.get_vocab()],
                         special_tokens=True)
    resolve_token_ids(provider, tokenizer)
    assert provider.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ds = VLMConversationDataset([tmp_path / "d.jsonl"], tokenizer, seq_length=160, **dataset_kwargs(provider))
    assert ds.stats.summary().startswith("2 conversations with 2 images and 2 videos")
    s = ds[0]
    assert s["video_grid_thw"].tolist() == [[2, 4, 6]] and s["pixel_values_videos"].shape == (48, 3 * 2 * 16 * 16)
    text = tokenizer.decode(s["tokens"])
    assert "<0.3 seconds>" in text.replace(" ", "") or "<0.3seconds>" in text.replace(" ", "")
    assert int((s["tokens"] == provider.video_token_id).sum()) == 12

    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    ids = s["tokens"][None]
    kinds = (ids == provider.image_token_id).int() + 2 * (ids == provider.video_token_id).int()
    hf_cfg = Qwen3VLConfig(**{k: v for k, v in provider.hf_config().items() if k not in ("architectures", "model_type")})
    hf_model = type("M", (), {"config": hf_cfg, "get_vision_position_ids": Qwen3VLModel.get_vision_position_ids})()
    ref, _ = Qwen3VLModel.get_rope_index(hf_model, ids, kinds,
                                         image_grid_thw=s["image_grid_thw"], video_grid_thw=s["video_grid_thw"])
    n = int((s["loss_mask"] > 0).nonzero().max()) + 1  # the padding after the conversation is ours alone
    assert torch.equal(s["mrope_position_ids"][:, :n], ref[:, 0, :n])

    run = RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=mcore)
    batch = collate([ds[0], ds[1]])
    seq = batch["tokens"].shape[1]
    loss = model(batch["tokens"], torch.arange(seq).expand(2, seq), None, labels=batch["labels"],
                 **model_inputs(batch, torch.device("cpu")))
    (loss * batch["loss_mask"]).sum().backward()
    assert model.image_encoder.patch_embed.weight.grad.abs().sum() > 0
    # (DeepStack 1 feeds the last of the 2 LLM layers: it reaches only the visual positions' own logits,
    # which carry no loss, so its gradient is zero -- as in HF)
    assert model.image_projector.deepstack_merger_list[0].linear_fc1.weight.grad.abs().sum() > 0
