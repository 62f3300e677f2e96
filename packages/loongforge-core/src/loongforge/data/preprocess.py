"""``loongforge data preprocess``: tokenize jsonl/parquet corpora into a megatron ``.bin/.idx`` pair.

Why: tokenizing a large corpus at every training start is slow and needs it all in RAM. This runs
once, in parallel worker processes, and writes the memory-mapped format read by
:class:`~loongforge.data.indexed.PackedIndexedDataset`.

How: the main process streams documents (so malformed lines are reported with file and line, or
skipped and counted), sends batches of texts to a pool of *spawned* workers (no fork of a process
holding tokenizer threads), and writes results strictly in input order, so the output is identical
for any number of workers: one sequence per document, EOS appended (:func:`encode_documents`).
At most ``2 * workers`` batches are in flight, so memory stays bounded. Output is written under a
temporary name and renamed at the end: a failed run leaves no half-written dataset behind.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loongforge.data.documents import ReadStats, count_records, iter_documents, resolve_paths
from loongforge.data.errors import DataError
from loongforge.data.tokenizer import encode_documents, eos_token_id, load_tokenizer, resolve_tokenizer_dir


@dataclass
class PreprocessResult:
    """What was written: the prefix of ``.bin/.idx``, counts, and elapsed seconds."""

    output_prefix: str
    documents: int
    tokens: int
    skipped: int
    empty: int
    seconds: float
    files: list[str]

    def summary(self) -> str:
        return (
            f"wrote {self.documents} documents, {self.tokens} tokens to {self.output_prefix}.bin/.idx "
            f"in {self.seconds:.1f}s ({self.skipped} malformed skipped, {self.empty} empty dropped)"
        )


# --- worker side ---------------------------------------------------------------------------------
# Workers get the Rust tokenizer serialised from the main process's transformers tokenizer, so
# they import only `tokenizers` (not transformers/torch: fast start) and cannot load a different
# file than the main process did. The main process cross-checks the first batch against
# encode_documents(), the reference used by in-memory packing.
_WORKER: tuple | None = None


def _init_worker(backend_json: str | None, tokenizer_dir: str, eos_id: int) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    if backend_json is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend_json)
        backend.no_truncation()
        backend.no_padding()
        _WORKER = ("backend", backend, eos_id)
    else:  # a tokenizer without a Rust backend: fall back to transformers in the worker
        _WORKER = ("hf", load_tokenizer(tokenizer_dir), eos_id)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    kind, tok, eos = _WORKER
    if kind == "backend":
        docs = [enc.ids + [eos] for enc in tok.encode_batch(texts, add_special_tokens=False)]
    else:
        docs = encode_documents(tok, texts)
    return _flatten(docs)


def _flatten(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 ids, per-document lengths): cheap to pickle back to the main process."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


# --- main side -----------------------------------------------------------------------------------
def _batches(docs: Iterator, batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc.text)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    text_field: str = "text",
    workers: int = 1,
    on_error: str = "raise",
    *,
    batch_size: int = 256,
    show_progress: bool = True,
) -> PreprocessResult:
    """Tokenize ``inputs`` (files, directories, globs) into ``{output_prefix}.bin/.idx``.

    ``workers > 1`` uses that many worker processes; ``workers <= 1`` tokenizes in this process.
    Raises DataError for missing inputs, malformed records (unless ``on_error="skip"``) or an
    input without documents.
    """
    t0 = time.perf_counter()
    files = resolve_paths(inputs)  # fail fast on user errors, before the slow megatron import
    tok_dir = str(resolve_tokenizer_dir(tokenizer_dir))
    tokenizer = load_tokenizer(tok_dir)
    from loongforge.data.indexed import megatron_indexed_dataset_module

    megatron = megatron_indexed_dataset_module()
    DType, IndexedDatasetBuilder = megatron.DType, megatron.IndexedDatasetBuilder
    dtype = DType.optimal_dtype(len(tokenizer))
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    stats = ReadStats()
    tokens = 0
    progress = _progress(show_progress)
    pool = None
    try:
        task = progress.add_task(f"tokenizing {len(files)} file(s)", total=count_records(files) or None)
        batches = _batches(iter_documents(files, text_field, on_error, stats), batch_size)

        def write(result: tuple[np.ndarray, np.ndarray]) -> None:
            nonlocal tokens
            flat, lengths = result
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                builder.add_document(flat[a:b], [int(b - a)])
            tokens += int(bounds[-1])
            progress.update(task, completed=stats.documents + stats.skipped + stats.empty)

        with progress:
            if workers <= 1:
                for batch in batches:
                    write(_flatten(encode_documents(tokenizer, batch)))
            else:
                backend = getattr(tokenizer, "backend_tokenizer", None)
                pool = ProcessPoolExecutor(
                    max_workers=workers,
                    mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded process
                    initializer=_init_worker,
                    initargs=(
                        backend.to_str() if backend is not None else None,
                        tok_dir,
                        eos_token_id(tokenizer),
                    ),
                )
                pending: deque[tuple[list[str] | None, Future]] = deque()
                for n, batch in enumerate(batches):
                    pending.append((batch if n == 0 else None, pool.submit(_encode_in_worker, batch)))
                    while len(pending) >= 2 * workers:
                        write(_checked(tokenizer, *pending.popleft()))
                while pending:
                    write(_checked(tokenizer, *pending.popleft()))
            progress.update(task, completed=progress.tasks[0].total or stats.documents)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return PreprocessResult(
        prefix,
        stats.documents,
        tokens,
        stats.skipped,
        stats.empty,
        time.perf_counter() - t0,
        [str(f) for f in files],
    )


def _checked(tokenizer, batch: list[str] | None, future: Future) -> tuple[np.ndarray, np.ndarray]:
    """The worker's result; for the first batch, verified against the main-process tokenizer."""
    result = future.result()
    if batch is not None:
        expected = _flatten(encode_documents(tokenizer, batch))
        if not all(np.array_equal(a, b) for a, b in zip(result, expected, strict=True)):
            raise RuntimeError("worker tokenization differs from the transformers tokenizer; use --workers 1")
    return result


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


# --- CLI glue ------------------------------------------------------------------------------------
def add_preprocess_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``data preprocess`` options to an (sub)parser; pair with :func:`run_preprocess`."""
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help=".jsonl/.json/.parquet files, directories or glob patterns (repeatable)",
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="local Hugging Face tokenizer directory, or builtin:tiny_stories",
    )
    parser.add_argument("--text-field", default="text", help="JSON key / parquet column holding the text")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="tokenizer worker processes (default: min(8, CPUs))",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="on a malformed record: stop with an error, or skip it and count it",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="documents per worker task")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def run_preprocess(args: argparse.Namespace) -> PreprocessResult:
    """Run :func:`preprocess` from parsed :func:`add_preprocess_arguments` options."""
    return preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        text_field=args.text_field,
        workers=args.workers,
        on_error=args.on_error,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )


def main_preprocess(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: parse ``argv``, run, print a summary. Returns the exit code."""
    parser = add_preprocess_arguments(
        argparse.ArgumentParser(prog="loongforge data preprocess", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        result = run_preprocess(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main_preprocess())
