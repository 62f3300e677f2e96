"""WebDataset tar shards: the streamed samples are the jsonl dataset's samples (same tensors),
data-parallel ranks and DataLoader workers split them without changing the order, and a reader
started after N consumed samples continues at sample N -- across shard and epoch boundaries."""

from __future__ import annotations

import json

import pytest
import torch
from loongforge.data.errors import DataError
from loongforge_vlm.data.conversations import VLMConversationDataset
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor
from loongforge_vlm.data.samples import SampleBuilder
from loongforge_vlm.data.shapes import write_shapes
from loongforge_vlm.data.tokenizer import load_vision_tokenizer
from loongforge_vlm.data.webdataset import WebDatasetConversations

PROC = Qwen2_5ImageProcessor(min_pixels=3136, max_pixels=12544)
TOKENS = dict(image_token="<|image_pad|>", vision_start="<|vision_start|>", vision_end="<|vision_end|>")
N, PER_SHARD = 23, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shapes set as jsonl + PNGs and as 3 tar shards (10, 10, 3 samples)."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("wds")
    jsonl = write_shapes(root / "shapes", n=N)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for s in range(0, N, PER_SHARD):
        with wds.TarWriter(str(root / f"shard-{s // PER_SHARD:03d}.tar")) as tar:
            for i, rec in enumerate(records[s:s + PER_SHARD], start=s):
                image = (jsonl.parent / rec["images"][0]).read_bytes()
                tar.write({"__key__": f"{i:06d}", "json": json.dumps({"messages": rec["messages"]}).encode(),
                           "png": image})
    return root, jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return load_vision_tokenizer("builtin:tiny_stories")


def reader(data, tokenizer, **kw):
    root, _ = data
    builder = SampleBuilder(tokenizer, PROC, seq_length=64, **TOKENS)
    return WebDatasetConversations(str(root / "shard-{000..002}.tar"), builder, PROC, **kw)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_samples_equal_the_jsonl_samples(data, tokenizer):
    _, jsonl = data
    ref = VLMConversationDataset([jsonl], tokenizer, PROC, seq_length=64, **TOKENS)
    stream = reader(data, tokenizer, shuffle=False, epochs=1)
    assert stream.counts == [10, 10, 3]
    got = list(stream)
    assert len(got) == N == len(ref)
    assert all(same(g, ref[i]) for i, g in enumerate(got))


def test_ranks_workers_and_resume(data, tokenizer):
    def keys(samples):  # a sample's identity: its tokens
        return [tuple(s["tokens"].tolist()) for s in samples]

    full = keys(reader(data, tokenizer, seed=7, epochs=3))  # 3 shuffled epochs, one rank
    assert len(full) == 3 * N and full[:N] != full[N:2 * N]  # each epoch its own shard order
    # 2 data-parallel ranks, micro-batch 2: rank r takes global samples r, r + 2, ...
    ranks = [keys(reader(data, tokenizer, seed=7, epochs=3, dp_rank=r, dp_size=2, micro_batch_size=2)) for r in (0, 1)]
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]
    # DataLoader with 2 workers (batches round-robin): the same order as in-process
    ds = reader(data, tokenizer, seed=7, epochs=3, dp_rank=1, dp_size=2, micro_batch_size=2)
    from loongforge_vlm.data.conversations import collate

    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    via_workers = [tuple(row.tolist()) for batch in loader for row in batch["tokens"]]
    assert via_workers == ranks[1][:len(via_workers)] and len(via_workers) >= len(ranks[1]) - 1
    # resume after 28 global samples (7 steps of 2 ranks x 2): inside the second epoch's first shard(s)
    for consumed in (0, 4, 20, 28, 44):
        again = reader(data, tokenizer, seed=7, epochs=3, dp_rank=1, dp_size=2, micro_batch_size=2)
        again.start(consumed)
        assert keys(again) == full[consumed + 1::2], consumed
    with pytest.raises(ValueError, match="whole number of micro-batches"):
        reader(data, tokenizer, dp_size=2, micro_batch_size=2).start(6)


def test_bad_member_names_shard_and_key(data, tokenizer, tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad.tar")) as tar:
        tar.write({"__key__": "a1", "json": json.dumps({"messages": [{"role": "user", "content": "<image>"},
                                                                     {"role": "assistant", "content": "x"}]}).encode(),
                   "png": b"not a png"})
    builder = SampleBuilder(tokenizer, PROC, seq_length=64, **TOKENS)
    stream = WebDatasetConversations([str(tmp_path / "bad.tar")], builder, PROC, epochs=1)
    with pytest.raises(DataError, match=r"bad\.tar:a1.*a1\.png"):
        list(stream)
    skipping = WebDatasetConversations([str(tmp_path / "bad.tar")], builder, PROC, epochs=1, on_error="skip")
    assert list(skipping) == [] and skipping.stats.skipped == 1
    with pytest.raises(DataError, match="not found"):
        WebDatasetConversations([str(tmp_path / "missing-{0..1}.tar")], builder, PROC)
