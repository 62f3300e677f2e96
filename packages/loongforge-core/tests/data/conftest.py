"""Fixtures for the data-pipeline tests: a small real tokenizer and corpus writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loongforge.data.synthetic_corpus import generate_stories
from loongforge.data.tokenizer import load_tokenizer, train_bpe_tokenizer


def _write_jsonl(path: Path, records: list) -> Path:
    """Each record is dumped as one line; a str record is written verbatim (to make bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=7)  # several row groups
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    return _write_jsonl


@pytest.fixture(scope="session")
def write_parquet():
    return _write_parquet


@pytest.fixture(scope="session")
def stories() -> list[str]:
    return generate_stories(80, seed=7)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_bpe_tokenizer(generate_stories(400, seed=5), 600, tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)
