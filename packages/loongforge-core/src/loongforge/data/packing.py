"""Packing documents into fixed-length training samples, with document boundaries kept.

Why packing: short documents padded to ``seq_length`` would waste most of the compute. Instead all
documents (each followed by EOS) are concatenated, in a seeded shuffled order, into one token stream
that is cut into samples of ``seq_length`` tokens. Sample ``i`` always reads stream positions
``[i*S, i*S + S]`` (S+1 tokens: inputs and shifted labels), so it is a pure function of ``i`` and a
run resumed at consumed sample ``k`` sees exactly the data of an uninterrupted run.

Sample dict (all tensors of length S; ``tokens``/``labels``/``position_ids``/``segment_ids`` int64,
``loss_mask`` float32):

* ``tokens[t]``: the input token; ``labels[t]``: the next token in the stream (``tokens`` shifted by one).
* ``loss_mask[t] = 1`` when ``labels[t]`` is a real prediction *inside the same document*, including
  predicting the document's EOS. It is 0 when ``tokens[t]`` is a document's EOS (the next token
  starts an unrelated document, which the model cannot and must not predict) and on padding.
* ``position_ids``: 0 at the start of the sample and at every document start in it, then +1 per token.
  (A document continued from the previous sample restarts at 0: the model cannot see its head.)
* ``segment_ids``: 0 for the first (possibly partial) document of the sample, +1 at each document
  start. A token may attend only to earlier tokens with the same segment id (block-diagonal causal
  mask), so nothing attends across documents.
* Padding (only in the last sample of the stream, when ``drop_last=False``): ``tokens``/``labels``
  = pad id, ``loss_mask`` 0, its own segment id (last real segment + 1) and positions from 0, so
  no real token attends to padding and no attention row is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from loongforge.data.errors import DataError
from loongforge.data.tokenizer import encode_documents, eos_token_id, pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def document_order(doc_ids: np.ndarray, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which documents are packed: a seeded permutation (shared by every packed dataset)."""
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if not shuffle:
        return doc_ids
    return doc_ids[np.random.default_rng(seed).permutation(len(doc_ids))]


def split_documents(num_docs: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded random ``valid_fraction`` of documents (at least one); returns sorted id arrays.

    Splitting documents (not samples) keeps a validation document from leaking into training.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_fraction == 0.0:
        return np.arange(num_docs, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_valid = max(1, int(round(num_docs * valid_fraction)))
    if n_valid >= num_docs:
        raise DataError(f"cannot hold out {valid_fraction:.0%} for validation: only {num_docs} documents")
    perm = np.random.default_rng([seed, 7919]).permutation(num_docs)  # independent of the packing rng
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


class PackedDataset(torch.utils.data.Dataset):
    """Base class: packs documents of given lengths, read through :meth:`_read_doc`.

    Subclasses set up storage and call ``_init_packing(doc_lengths_in_packed_order, ...)``.
    """

    seq_length: int
    pad_id: int

    def _init_packing(self, doc_lengths: np.ndarray, seq_length: int, pad_id: int, drop_last: bool) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        if len(lengths) == 0 or lengths.sum() < 2:
            raise DataError("cannot pack an empty dataset (need at least 2 tokens)")
        self.seq_length = int(seq_length)
        self.pad_id = int(pad_id)
        # starts[d] = stream position of the d-th packed document; starts[-1] = stream length.
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self._starts[-1])
        predictions = self.num_tokens - 1  # every stream token but the first is a label once
        n = predictions // self.seq_length if drop_last else -(-predictions // self.seq_length)
        if n == 0:
            raise DataError(
                f"dataset has {self.num_tokens} tokens, fewer than one sample of seq_length "
                f"{self.seq_length} + 1 (use drop_last=False or more data)"
            )
        self._num_samples = int(n)

    @property
    def num_documents(self) -> int:
        return len(self._starts) - 1

    def _read_doc(self, packed_doc: int, begin: int, end: int) -> np.ndarray:
        """Tokens ``[begin, end)`` of the ``packed_doc``-th document in packing order."""
        raise NotImplementedError

    def _read_stream(self, begin: int, end: int) -> np.ndarray:
        first = int(np.searchsorted(self._starts, begin, side="right")) - 1
        pieces, doc = [], first
        while begin < end:
            doc_begin, doc_end = int(self._starts[doc]), int(self._starts[doc + 1])
            stop = min(end, doc_end)
            if stop > begin:
                pieces.append(self._read_doc(doc, begin - doc_begin, stop - doc_begin))
            begin, doc = stop, doc + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if idx < 0:
            idx += self._num_samples
        if not 0 <= idx < self._num_samples:
            raise IndexError(f"sample {idx} out of range for dataset of {self._num_samples} samples")
        S, N = self.seq_length, self.num_tokens
        start = idx * S
        chunk = self._read_stream(start, min(start + S + 1, N)).astype(np.int64)
        n = min(S, N - start)  # real input tokens in this sample
        pos = np.arange(start, start + n)
        doc = np.searchsorted(self._starts, pos, side="right") - 1
        doc_start = np.maximum(self._starts[doc], start)

        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        position_ids = np.zeros(S, dtype=np.int64)
        segment_ids = np.zeros(S, dtype=np.int64)
        tokens[:n] = chunk[:n]
        labels[: len(chunk) - 1] = chunk[1:]
        loss_mask[:n] = pos + 1 < self._starts[doc + 1]  # the label is in the same document
        position_ids[:n] = pos - doc_start
        segment_ids[:n] = doc - doc[0]
        if n < S:  # tail padding: its own segment, positions from 0
            segment_ids[n:] = segment_ids[n - 1] + 1
            position_ids[n:] = np.arange(S - n)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment_ids),
        }


class TokenizedCorpus:
    """Token ids of many documents in one flat array plus offsets (tokenize once, slice cheaply).

    Each document is tokenized with :func:`encode_documents` (EOS appended).
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        self.tokens = tokens
        self.offsets = offsets

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, batch_size: int = 1000
    ) -> TokenizedCorpus:
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
        chunks: list[np.ndarray] = []
        lengths: list[int] = []
        batch: list[str] = []

        def flush() -> None:
            for ids in encode_documents(tokenizer, batch):
                chunks.append(np.asarray(ids, dtype=dtype))
                lengths.append(len(ids))
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) >= batch_size:
                flush()
        flush()
        if not chunks:
            raise DataError("no documents to tokenize")
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls(np.concatenate(chunks), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


class PackedTextDataset(PackedDataset):
    """Packed samples from in-memory documents (texts, or an already tokenized corpus).

    ``doc_ids`` restricts to a subset of documents (e.g. a train/valid split); ``seed`` and
    ``shuffle`` fix the packing order. The packed stream is materialised once as a numpy array.
    """

    def __init__(
        self,
        documents: Iterable[str] | TokenizedCorpus,
        tokenizer: PreTrainedTokenizerBase,
        seq_length: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        doc_ids: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
    ) -> None:
        corpus = (
            documents
            if isinstance(documents, TokenizedCorpus)
            else TokenizedCorpus.from_texts(documents, tokenizer)
        )
        self.eos_id = eos_token_id(tokenizer)
        ids = np.arange(len(corpus)) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
        self.doc_order = document_order(ids, seed, shuffle)
        lengths = corpus.doc_lengths[self.doc_order]
        if len(self.doc_order):
            self._stream = np.concatenate([corpus.document(d) for d in self.doc_order])
        self._init_packing(lengths, seq_length, pad_token_id(tokenizer), drop_last)

    def _read_doc(self, packed_doc: int, begin: int, end: int) -> np.ndarray:
        base = self._starts[packed_doc]
        return self._stream[base + begin : base + end]

    def _read_stream(self, begin: int, end: int) -> np.ndarray:
        return self._stream[begin:end]  # contiguous already: one slice

    @property
    def token_stream(self) -> np.ndarray:
        """The whole packed stream (documents + EOS in packing order); for tests and inspection."""
        return self._stream


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack sample dicts into a batch: every value becomes a ``[B, S]`` tensor."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
