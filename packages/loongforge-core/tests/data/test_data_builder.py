"""build_pretrain_dataset from config mappings, and the DataLoader helper."""

from __future__ import annotations

import pytest
import torch
from loongforge.data.blend import BlendedDataset
from loongforge.data.builder import build_pretrain_dataloader, build_pretrain_dataset
from loongforge.data.errors import DataError
from loongforge.data.packing import SAMPLE_KEYS, PackedTextDataset
from loongforge.data.preprocess import preprocess
from omegaconf import OmegaConf


@pytest.fixture(scope="module")
def two_files(tmp_path_factory, stories, write_jsonl, write_parquet):
    root = tmp_path_factory.mktemp("builder")
    return (
        write_jsonl(root / "a.jsonl", [{"body": t} for t in stories[:50]]),
        write_parquet(root / "b.parquet", {"body": stories[50:]}),
    )


def test_builtin_corpus_with_validation_split():
    from loongforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:tiny_stories")
    cfg = OmegaConf.create(
        {"data": {"paths": ["builtin:tiny_stories"], "valid_fraction": 0.05, "weights": None}}
    )
    train, valid = build_pretrain_dataset(cfg.data, tok, seq_length=128, seed=1)
    assert isinstance(train, PackedTextDataset) and isinstance(valid, PackedTextDataset)
    assert not set(train.doc_order.tolist()) & set(valid.doc_order.tolist())
    assert len(valid.doc_order) == 200 and len(train) > 10 * len(valid)
    assert set(train[0]) == set(SAMPLE_KEYS)


def test_blend_of_two_paths(two_files, tokenizer):
    cfg = {
        "paths": [str(p) for p in two_files],
        "weights": [0.8, 0.2],
        "text_field": "body",
        "valid_fraction": 0.1,
    }
    train, valid = build_pretrain_dataset(cfg, tokenizer, seq_length=32, seed=4)
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    assert abs(train.realised_weights()[0] - 0.8) < 0.01
    assert len(train) == sum(len(d) for d in train.datasets)
    again, _ = build_pretrain_dataset(cfg, tokenizer, seq_length=32, seed=4)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in (0, 5, len(train) - 1))


def test_indexed_format_matches_text_format(two_files, tokenizer, tokenizer_dir, tmp_path):
    preprocess([two_files[0]], tmp_path / "a", tokenizer_dir, text_field="body", show_progress=False)
    common = {"valid_fraction": 0.2, "text_field": "body"}
    t_train, t_valid = build_pretrain_dataset({"paths": [str(two_files[0])], **common}, tokenizer, 24, seed=8)
    i_train, i_valid = build_pretrain_dataset(
        {"format": "indexed", "paths": [str(tmp_path / "a")], **common}, tokenizer, 24, seed=8
    )
    for text_ds, idx_ds in ((t_train, i_train), (t_valid, i_valid)):
        assert len(text_ds) == len(idx_ds)
        for i in range(len(text_ds)):
            assert all(torch.equal(text_ds[i][k], idx_ds[i][k]) for k in SAMPLE_KEYS)


def test_valid_paths(two_files, tokenizer):
    cfg = {"paths": [str(two_files[0])], "valid_paths": [str(two_files[1])], "text_field": "body"}
    train, valid = build_pretrain_dataset(cfg, tokenizer, 32)
    assert len(valid.doc_order) == 30 and len(train.doc_order) == 50


def test_no_validation_by_default(two_files, tokenizer):
    assert (
        build_pretrain_dataset({"paths": str(two_files[0]), "text_field": "body"}, tokenizer, 32)[1] is None
    )


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"paths": []}, "data.paths is empty"),
        ({"paths": ["/nonexistent/corpus.jsonl"]}, "/nonexistent/corpus.jsonl"),
        ({"paths": ["builtin:nope"]}, "unknown builtin corpus"),
        ({"paths": ["x", "y"], "weights": [1.0]}, "1 entries for 2 paths"),
        ({"paths": ["x"], "format": "csv"}, "data.format"),
        ({"paths": ["x"], "on_error": "ignore"}, "data.on_error"),
        ({"paths": ["x"], "valid_fraction": 0.1, "valid_paths": ["y"]}, "not both"),
        ({"paths": ["/nonexistent/prefix"], "format": "indexed"}, "prefix.bin"),
    ],
)
def test_config_errors(cfg, match, tokenizer):
    with pytest.raises(DataError, match=match):
        build_pretrain_dataset(cfg, tokenizer, 32)


def test_malformed_record_respects_on_error(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "Tom ran to the park."}] * 5 + ["oops"])
    with pytest.raises(DataError, match="a.jsonl:6"):
        build_pretrain_dataset({"paths": [str(path)]}, tokenizer, 8)
    train, _ = build_pretrain_dataset({"paths": [str(path)], "on_error": "skip"}, tokenizer, 8)
    assert len(train.doc_order) == 5


def test_dataloader_resumes_mid_run(tokenizer, stories):
    from itertools import islice

    ds = PackedTextDataset(stories, tokenizer, 16, seed=0)
    kw = dict(micro_batch_size=2, global_batch_size=4, seed=3)
    full = [b["tokens"] for b in islice(build_pretrain_dataloader(ds, **kw), 12)]
    resumed = [b["tokens"] for b in islice(build_pretrain_dataloader(ds, consumed_samples=12, **kw), 6)]
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed, strict=True))
    assert full[0].shape == (2, 16)
