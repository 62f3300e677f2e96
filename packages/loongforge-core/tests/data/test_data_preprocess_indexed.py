"""Multiprocess preprocessing to megatron .bin/.idx and packed samples read back from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loongforge.data.errors import DataError
from loongforge.data.indexed import PackedIndexedDataset
from loongforge.data.packing import SAMPLE_KEYS, PackedTextDataset
from loongforge.data.preprocess import main_preprocess, preprocess
from loongforge.data.tokenizer import encode_documents
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, stories, write_jsonl, write_parquet):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "a.jsonl", [{"text": t} for t in stories[:30]])
    write_parquet(root / "b.parquet", {"text": stories[30:55]})
    write_jsonl(root / "c.jsonl", [{"text": t} for t in stories[55:]])
    return [root / "a.jsonl", root / "b.parquet", root / "c.jsonl"]


@pytest.fixture(scope="module")
def prefix_2_workers(tmp_path_factory, corpus_files, tokenizer_dir):
    prefix = tmp_path_factory.mktemp("idx") / "stories"
    result = preprocess(corpus_files, prefix, tokenizer_dir, workers=2, batch_size=8)
    return prefix, result


def test_two_workers_write_the_directly_tokenized_stream(prefix_2_workers, stories, tokenizer):
    prefix, result = prefix_2_workers
    expected = encode_documents(tokenizer, stories)
    assert (result.documents, result.skipped) == (len(stories), 0)
    assert result.tokens == sum(map(len, expected))
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(stories) and ds.document_indices.tolist() == list(range(len(stories) + 1))
    assert ds.index.dtype == np.uint16  # small vocab -> compact token file
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids  # one sequence per document, EOS appended, input order kept


def test_output_does_not_depend_on_worker_count(prefix_2_workers, corpus_files, tokenizer_dir, tmp_path):
    prefix, _ = prefix_2_workers
    single = preprocess(corpus_files, tmp_path / "one", tokenizer_dir, workers=1, show_progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == prefix.with_name(prefix.name + suffix).read_bytes()
    assert single.documents == len(single.files) * 0 + 80


@pytest.mark.parametrize("S", [16, 200])
def test_indexed_samples_equal_text_samples(prefix_2_workers, stories, tokenizer, S):
    prefix, _ = prefix_2_workers
    text_ds = PackedTextDataset(stories, tokenizer, S, seed=11)
    idx_ds = PackedIndexedDataset(prefix, S, tokenizer.pad_token_id, seed=11)
    assert len(idx_ds) == len(text_ds)
    for i in range(len(text_ds)):
        a, b = text_ds[i], idx_ds[i]
        for key in SAMPLE_KEYS:
            assert torch.equal(a[key], b[key]), (i, key)
    subset = [3, 5, 40, 79]
    sub_text = PackedTextDataset(stories, tokenizer, S, seed=2, doc_ids=subset)
    sub_idx = PackedIndexedDataset(prefix, S, tokenizer.pad_token_id, seed=2, doc_ids=subset)
    assert all(torch.equal(sub_text[i]["tokens"], sub_idx[i]["tokens"]) for i in range(len(sub_idx)))


def test_malformed_input_raises_and_leaves_nothing(tmp_path, tokenizer_dir, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 20 + ['{"text": 1}'])
    with pytest.raises(DataError, match=f"{bad}:21"):
        preprocess([bad], tmp_path / "out", tokenizer_dir, workers=2, batch_size=4)
    assert list(tmp_path.glob("out*")) == []
    result = preprocess([bad], tmp_path / "out", tokenizer_dir, workers=2, on_error="skip", batch_size=4)
    assert (result.documents, result.skipped) == (20, 1)
    assert len(IndexedDataset(str(tmp_path / "out"))) == 20


def test_missing_input_and_tokenizer(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match="missing.jsonl"):
        preprocess([tmp_path / "missing.jsonl"], tmp_path / "out", tokenizer_dir)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="tokenizer directory not found"):
        preprocess([tmp_path / "a.jsonl"], tmp_path / "out", tmp_path / "no_tok")


def test_cli_entry_point(tmp_path, corpus_files, tokenizer_dir, capsys):
    argv = [
        "--input",
        str(corpus_files[0]),
        "--input",
        str(corpus_files[1]),
        "--output-prefix",
        str(tmp_path / "cli"),
        "--tokenizer",
        str(tokenizer_dir),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main_preprocess(argv) == 0
    assert "wrote 55 documents" in capsys.readouterr().out
    assert len(IndexedDataset(str(tmp_path / "cli"))) == 55
    assert (
        main_preprocess(
            [
                "--input",
                str(tmp_path / "nope.jsonl"),
                "--output-prefix",
                str(tmp_path / "x"),
                "--tokenizer",
                str(tokenizer_dir),
            ]
        )
        == 1
    )
    assert "nope.jsonl" in capsys.readouterr().err


def test_multi_sequence_documents_are_read_whole(tmp_path):
    # Megatron's sentence-split files store several sequences per document, contiguously.
    prefix = str(tmp_path / "multi")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(np.array([5, 6, 7, 0]), [2, 2])  # one document of two sequences
    builder.add_document(np.array([8, 9, 0]), [3])
    builder.finalize(prefix + ".idx")
    ds = PackedIndexedDataset(prefix, 8, pad_id=0, shuffle=False)
    s = ds[0]
    assert s["tokens"].tolist() == [5, 6, 7, 0, 8, 9, 0, 0]
    assert s["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert s["loss_mask"].tolist() == [1, 1, 1, 0, 1, 1, 0, 0]


def test_missing_indexed_prefix(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.bin"):
        PackedIndexedDataset(tmp_path / "nothing", 8, pad_id=0)
