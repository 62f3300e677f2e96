"""Reading jsonl/parquet corpora: strictness, skip-and-count, missing files, empty datasets."""

from __future__ import annotations

import pytest
from loongforge.data.documents import ReadStats, count_records, iter_documents, read_texts
from loongforge.data.errors import DataError


def test_jsonl_reads_texts_in_order_with_custom_field(tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"body": "first"}, {"body": "sec\u2028ond", "x": 1}, {"body": "third"}]
    )
    docs = list(iter_documents(path, text_field="body"))
    assert [d.text for d in docs] == ["first", "sec\u2028ond", "third"]
    assert [d.index for d in docs] == [1, 2, 3] and docs[0].source == str(path)


def test_parquet_streams_all_row_groups(tmp_path, write_parquet):
    texts = [f"doc number {i}" for i in range(30)]
    path = write_parquet(tmp_path / "a.parquet", {"text": texts, "id": list(range(30))})
    got, stats = read_texts(path)
    assert got == texts and stats.documents == 30 and count_records([path]) == 30


def test_multiple_files_directory_and_glob(tmp_path, write_jsonl, write_parquet):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"text": "b1"}])
    write_jsonl(d / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    write_parquet(d / "c.parquet", {"text": ["c1"]})
    assert read_texts(d)[0] == ["a1", "a2", "b1", "c1"]
    assert read_texts(str(d / "*.jsonl"))[0] == ["a1", "a2", "b1"]


@pytest.mark.parametrize(
    ("bad_line", "why"),
    [
        ("{not json", "malformed line"),
        ('{"other": "x"}', "missing field 'text'"),
        ('{"text": 5}', "must be a string"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tmp_path, bad_line, why, write_jsonl):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "ok"}, "", {"text": "ok too"}, bad_line, {"text": "x"}]
    )
    with pytest.raises(DataError) as err:
        list(iter_documents(path))
    assert f"{path}:4" in str(err.value) and why in str(err.value)
    assert isinstance(err.value, ValueError)


def test_invalid_utf8_is_a_malformed_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=f"{path}:2"):
        read_texts(path)


def test_skip_mode_skips_and_counts(tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"text": "one"}, "{broken", {"text": None}, {"text": ""}, {"text": "two"}, "   ", {"no": 1}],
    )
    texts, stats = read_texts(path, on_error="skip")
    assert texts == ["one", "two"]
    assert (stats.documents, stats.skipped, stats.empty) == (2, 3, 1)
    assert f"{path}:2" in stats.examples[0] and "3 malformed skipped" in stats.summary()


def test_parquet_bad_row_reports_row_index_or_is_skipped(tmp_path, write_parquet):
    path = write_parquet(tmp_path / "p.parquet", {"text": ["a", "b", None, "d"]})
    with pytest.raises(DataError, match=r"p\.parquet: row 2 "):
        read_texts(path)
    texts, stats = read_texts(path, on_error="skip")
    assert texts == ["a", "b", "d"] and stats.skipped == 1


def test_parquet_missing_column_is_a_file_error(tmp_path, write_parquet):
    path = write_parquet(tmp_path / "p.parquet", {"content": ["a"]})
    with pytest.raises(DataError, match="no column 'text'.*content"):
        read_texts(path, on_error="skip")


def test_missing_files_are_all_named(tmp_path, write_jsonl):
    present = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as err:
        read_texts([present, tmp_path / "gone1.jsonl", tmp_path / "gone2.parquet"])
    assert "gone1.jsonl" in str(err.value) and "gone2.parquet" in str(err.value)


def test_unsupported_suffix(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported"):
        read_texts(tmp_path / "a.txt")


def test_empty_dataset_names_paths(tmp_path, write_jsonl):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ['{"x": 1}'])
    with pytest.raises(DataError, match="no documents.*empty.jsonl.*bad.jsonl.*1 malformed skipped"):
        read_texts([empty, only_bad], on_error="skip")


def test_stats_accumulate_across_calls(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    stats = ReadStats()
    list(iter_documents(path, stats=stats))
    list(iter_documents(path, stats=stats))
    assert stats.documents == 4


def test_builtin_corpus_name():
    texts, stats = read_texts("builtin:tiny_stories")
    assert stats.documents == len(texts) >= 2000
    with pytest.raises(DataError, match="unknown builtin corpus"):
        read_texts("builtin:nope")
