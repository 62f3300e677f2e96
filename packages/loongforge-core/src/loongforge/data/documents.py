"""Streaming readers for text corpora stored as JSON-lines or Parquet.

Why streaming: pre-training corpora are often larger than RAM, so documents are yielded one at a
time (jsonl line by line, parquet batch by batch) and never materialised unless asked for.

Why strict by default: a silently dropped or mangled line changes what the model trains on. A bad
record raises :class:`DataError` naming the file and the 1-based line number (parquet: the 0-based
row index). With ``on_error="skip"`` bad records are skipped instead and counted in
:class:`ReadStats`, so the caller can report how much was lost.

Accepted paths: ``.jsonl``/``.json`` (JSON lines, one object per line), ``.parquet``, a directory
(every such file inside it, recursively, sorted), a glob pattern, or ``builtin:tiny_stories``.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loongforge.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

OnError = Literal["raise", "skip"]

#: How many example messages of skipped records are kept in ReadStats.examples.
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Document:
    """One document: its text and where it came from (``index``: jsonl 1-based line, parquet 0-based row)."""

    text: str
    source: str
    index: int


@dataclass
class ReadStats:
    """Counts collected while reading; ``skipped`` are malformed records dropped under ``on_error="skip"``.

    ``empty`` counts well-formed records whose text is the empty string: they carry nothing to learn
    and are always dropped (not an error). Blank lines in jsonl are ignored and not counted.
    """

    documents: int = 0
    skipped: int = 0
    empty: int = 0
    examples: list[str] = field(default_factory=list)

    def note_skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)

    def summary(self) -> str:
        text = (
            f"{self.documents} documents read, {self.skipped} malformed skipped, {self.empty} empty dropped"
        )
        if self.examples:
            text += "; e.g. " + " | ".join(self.examples)
        return text


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, directories and glob patterns into a list of corpus files, in a stable order.

    Raises DataError naming every path that does not exist (or matches nothing), or that has an
    unsupported suffix.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise DataError("no data paths given")
    files: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        if str(raw).startswith("builtin:"):  # a corpus shipped with the package
            from loongforge.data.synthetic_corpus import builtin_corpus_path

            raw = builtin_corpus_path(str(raw)[len("builtin:") :])
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
            if not found:
                missing.append(f"{p} (directory without .jsonl/.json/.parquet files)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(str(raw)):
            found = sorted(Path(f) for f in glob.glob(str(raw), recursive=True) if Path(f).is_file())
            if not found:
                missing.append(f"{raw} (pattern matches no file)")
            files.extend(found)
        else:
            missing.append(str(p))
    if missing:
        raise DataError("data file(s) not found: " + ", ".join(missing))
    bad = [str(f) for f in files if f.suffix not in SUPPORTED_SUFFIXES]
    if bad:
        raise DataError(
            f"unsupported data file type (expected {', '.join(SUPPORTED_SUFFIXES)}): " + ", ".join(bad)
        )
    return files


def _iter_jsonl(path: Path, text_field: str, on_error: OnError, stats: ReadStats) -> Iterator[Document]:
    # Binary mode: split on b"\n" only (a JSON string may legally contain U+2028 etc.), decode per line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problem = f"{where}: malformed line: {e}"
            else:
                if not isinstance(record, dict):
                    problem = f"{where}: expected a JSON object, got {type(record).__name__}"
                elif text_field not in record:
                    problem = f"{where}: missing field {text_field!r} (keys: {sorted(record)[:10]})"
                elif not isinstance(record[text_field], str):
                    kind = type(record[text_field]).__name__
                    problem = f"{where}: field {text_field!r} must be a string, got {kind}"
                else:
                    text = record[text_field]
                    if text:
                        stats.documents += 1
                        yield Document(text, str(path), lineno)
                    else:
                        stats.empty += 1
                    continue
            if on_error == "raise":
                raise DataError(problem)
            stats.note_skip(problem)


def _iter_parquet(path: Path, text_field: str, on_error: OnError, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        # A schema problem concerns the whole file, so it is never "skipped".
        raise DataError(f"{path}: no column {text_field!r} (columns: {names})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                if value:
                    stats.documents += 1
                    yield Document(value, str(path), row)
                else:
                    stats.empty += 1
            else:
                problem = (
                    f"{path}: row {row} (0-based): field {text_field!r} must be a string, "
                    f"got {'null' if value is None else type(value).__name__}"
                )
                if on_error == "raise":
                    raise DataError(problem)
                stats.note_skip(problem)
            row += 1


def iter_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    on_error: OnError = "raise",
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Yield documents from all files in order, streaming.

    Missing files are reported before anything is read. When the files turn out to hold no
    document at all, DataError is raised at the end naming them. Pass a ReadStats to get counts.
    """
    _check_on_error(on_error)
    files = resolve_paths(paths)
    stats = stats if stats is not None else ReadStats()
    before = stats.documents
    for path in files:
        reader = _iter_parquet if path.suffix in PARQUET_SUFFIXES else _iter_jsonl
        yield from reader(path, text_field, on_error, stats)
    if stats.documents == before:
        raise DataError(
            f"no documents with a non-empty {text_field!r} field in: {', '.join(map(str, files))}"
            f" ({stats.skipped} malformed skipped, {stats.empty} empty)"
        )


def read_texts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    on_error: OnError = "raise",
) -> tuple[list[str], ReadStats]:
    """Read every document into memory; returns the texts and the read counts (for small corpora)."""
    stats = ReadStats()
    texts = [doc.text for doc in iter_documents(paths, text_field, on_error, stats)]
    return texts, stats


def count_records(paths: Iterable[Path]) -> int:
    """Cheap upper bound of the number of records (jsonl: newlines, parquet: metadata), for progress bars."""
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        if path.suffix in PARQUET_SUFFIXES:
            try:
                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:
                pass  # the reader reports the real problem with a proper message
        else:
            with open(path, "rb") as f:
                last = b"\n"
                while chunk := f.read(1 << 22):
                    total += chunk.count(b"\n")
                    last = chunk[-1:]
                total += last != b"\n"
    return total
