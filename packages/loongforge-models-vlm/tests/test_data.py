"""Multimodal conversation data: placeholders -> image tokens, prompt masking, bad images named."""

from __future__ import annotations

import json

import pytest
import torch
from loongforge.data.errors import DataError
from loongforge_vlm.data.conversations import VLMConversationDataset, collate
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.data.tokenizer import load_vision_tokenizer

PROC = Qwen2_5ImageProcessor(min_pixels=3136, max_pixels=12544)
TOKENS = dict(image_token="<|image_pad|>", vision_start="<|vision_start|>", vision_end="<|vision_end|>")


@pytest.fixture(scope="module")
def tokenizer():
    return load_vision_tokenizer("builtin:tiny_stories")


def write(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def convo(image="a.png", answer="A red square."):
    return {"messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                         {"role": "assistant", "content": answer}], "images": [image]}


def test_sample_layout_and_prompt_masking(tmp_path, tokenizer):
    shape_image(112, 56, "red").save(tmp_path / "a.png")  # grid 4x8 patches -> 2x4 = 8 image tokens
    shape_image(56, 56, "blue", "circle").save(tmp_path / "b.png")  # 4 image tokens
    path = write(tmp_path, [convo(), convo("b.png", "A blue circle.")])
    ds = VLMConversationDataset([path], tokenizer, PROC, seq_length=64, **TOKENS)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_id >= 1022  # appended to the text tokenizer
    s = ds[0]
    assert int((s["tokens"] == image_id).sum()) == 8
    assert s["image_grid_thw"].tolist() == [[1, 4, 8]]
    assert s["pixel_values"].shape == (32, 3 * 2 * 14 * 14)
    # loss only on the answer and its end-of-turn marker
    answer = tokenizer.decode(s["labels"][s["loss_mask"] > 0])
    assert answer.replace(" ", "") == "Ared square.<|im_end|>".replace(" ", "")
    assert not (s["loss_mask"][s["labels"] == image_id]).any()
    # mrope: the image spans 1 x 2 x 4 positions from its start, text resumes at start + 4
    first = int((s["tokens"] == image_id).nonzero()[0])
    pos = s["mrope_position_ids"]
    assert pos[:, first - 1].tolist() == [first - 1] * 3
    assert pos[1, first:first + 8].tolist() == [first] * 4 + [first + 1] * 4
    assert pos[2, first:first + 8].tolist() == [first + i for i in range(4)] * 2
    assert pos[:, first + 8].tolist() == [first + 4] * 3
    batch = collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 64) and batch["mrope_position_ids"].shape == (2, 3, 64)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 4]]
    assert batch["pixel_values"].shape[0] == 32 + 16


def test_missing_and_corrupt_images_are_named(tmp_path, tokenizer):
    shape_image(56, 56, "red").save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write(tmp_path, [convo(), convo("missing.png"), convo("broken.png")])
    with pytest.raises(DataError, match=r"data.jsonl:2: image not found: .*missing.png"):
        VLMConversationDataset([path], tokenizer, PROC, seq_length=64, **TOKENS)
    ds = VLMConversationDataset([path], tokenizer, PROC, seq_length=64, on_error="skip", **TOKENS)
    assert len(ds) == 1 and ds.stats.skipped == 2
    assert any("data.jsonl:3" in e and "broken.png" in e for e in ds.stats.errors)


def test_placeholder_count_and_length_checked(tmp_path, tokenizer):
    shape_image(56, 56, "red").save(tmp_path / "a.png")
    bad = convo()
    bad["images"] = ["a.png", "a.png"]
    with pytest.raises(DataError, match=r"data.jsonl:1: 1 <image> placeholders but 2 images"):
        VLMConversationDataset([write(tmp_path, [bad])], tokenizer, PROC, seq_length=64, **TOKENS)
    with pytest.raises(DataError, match=r"data.jsonl:1: the conversation has \d+ tokens"):
        VLMConversationDataset([write(tmp_path, [convo()])], tokenizer, PROC, seq_length=8, **TOKENS)


def test_dynamic_resolution_bounds():
    p = Qwen2_5ImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    assert p.target_size(20, 20) == (56, 56)  # upscaled to min_pixels
    h, w = p.target_size(1000, 500)  # downscaled under max_pixels, aspect about kept, multiples of 28
    assert h * w <= 112 * 112 and h % 28 == 0 and w % 28 == 0 and h > 2 * w - 28 - 1 and h > w
    patches, grid = p(shape_image(84, 56, "green"))
    assert grid == (1, 4, 6) and patches.shape == (24, 1176) and p.num_tokens(grid) == 6
    assert torch.isfinite(patches).all()
