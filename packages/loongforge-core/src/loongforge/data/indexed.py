"""Packed samples over a megatron-core ``.bin/.idx`` indexed dataset (for corpora larger than RAM).

Why megatron's format: it is the de-facto standard (memory-mapped token file + small index), so
corpora preprocessed by Megatron-LM tools work here too, and ours work there.

Documents: a megatron document may consist of several sequences (sentence splitting); they are
stored contiguously, so a document is read as one span starting at its first sequence. Files
written by :mod:`loongforge.data.preprocess` hold one sequence per document, EOS included.

Samples have exactly the semantics of :class:`~loongforge.data.packing.PackedTextDataset` (see
that module): with the same documents, seed and seq_length both yield identical samples.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from loongforge.data.errors import DataError
from loongforge.data.packing import PackedDataset, document_order


def megatron_indexed_dataset_module():
    """``megatron.core.datasets.indexed_dataset``, imported quietly (its import warns about optional
    GPU extensions, irrelevant to reading token files) and only when needed (it is slow to import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed_dataset(path_prefix: str | os.PathLike):
    """Open ``{prefix}.bin``/``{prefix}.idx`` (memory-mapped, CPU only) with a clear error if missing."""
    prefix = str(path_prefix)
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"indexed dataset not found: {', '.join(missing)} (create it with `loongforge data preprocess`)"
        )
    IndexedDataset = megatron_indexed_dataset_module().IndexedDataset
    try:
        with warnings.catch_warnings():  # "could not determine rank" outside torch.distributed
            warnings.simplefilter("ignore")
            return IndexedDataset(prefix, multimodal=False, mmap=True)
    except (AssertionError, ValueError, OSError) as e:
        raise DataError(f"cannot read indexed dataset {prefix}: {e}") from e


def indexed_document_lengths(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per document: (first sequence index, total token count), from the index only."""
    doc_idx = np.asarray(dataset.document_indices, dtype=np.int64)
    seq_lens = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    first_seq = doc_idx[:-1]
    csum = np.concatenate([[0], np.cumsum(seq_lens)])
    return first_seq, csum[doc_idx[1:]] - csum[first_seq]


class PackedIndexedDataset(PackedDataset):
    """Map-style packed dataset reading tokens lazily from an indexed dataset.

    Args:
        path_prefix: prefix of the ``.bin/.idx`` pair.
        seq_length, seed, shuffle, drop_last: as for PackedTextDataset.
        pad_id: id used for padding the final sample (always loss-masked).
        doc_ids: optional subset of document indices (e.g. a train/valid split).

    Empty documents (0 tokens) are ignored.
    """

    def __init__(
        self,
        path_prefix: str | os.PathLike,
        seq_length: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        doc_ids: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
    ) -> None:
        self.path_prefix = str(path_prefix)
        self._dataset = open_indexed_dataset(self.path_prefix)
        first_seq, lengths = indexed_document_lengths(self._dataset)
        self.total_documents = len(lengths)
        ids = np.arange(len(lengths)) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(lengths)):
            raise DataError(f"{self.path_prefix}: document ids out of range 0..{len(lengths) - 1}")
        ids = ids[lengths[ids] > 0]
        self.doc_order = document_order(ids, seed, shuffle)
        self._first_seq = first_seq[self.doc_order]
        self._init_packing(lengths[self.doc_order], seq_length, pad_id, drop_last)

    def _read_doc(self, packed_doc: int, begin: int, end: int) -> np.ndarray:
        return self._dataset.get(int(self._first_seq[packed_doc]), offset=begin, length=end - begin)
