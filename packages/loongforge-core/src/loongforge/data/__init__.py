"""Data pipeline for pre-training: read corpora, tokenize, pack, blend, sample.

Exports are imported lazily (PEP 562), so ``import loongforge.data`` stays cheap: torch and
megatron-core load only when a dataset class is used, and preprocessing worker processes import
just the tokenizer code.

Typical use::

    tok = load_tokenizer("builtin:tiny_stories")
    train, valid = build_pretrain_dataset(cfg.data, tok, seq_length=256, seed=1234)
    loader = build_pretrain_dataloader(train, micro_batch_size=8, global_batch_size=32,
                                       consumed_samples=resumed_consumed_samples, seed=1234)
"""

from __future__ import annotations

import importlib
from typing import Any

from loongforge.data.errors import DataError

_EXPORTS = {
    "Document": "documents",
    "ReadStats": "documents",
    "iter_documents": "documents",
    "read_texts": "documents",
    "resolve_paths": "documents",
    "load_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "encode_documents": "tokenizer",
    "eos_token_id": "tokenizer",
    "pad_token_id": "tokenizer",
    "PackedDataset": "packing",
    "PackedTextDataset": "packing",
    "TokenizedCorpus": "packing",
    "SAMPLE_KEYS": "packing",
    "collate": "packing",
    "split_documents": "packing",
    "PackedIndexedDataset": "indexed",
    "open_indexed_dataset": "indexed",
    "preprocess": "preprocess",
    "PreprocessResult": "preprocess",
    "add_preprocess_arguments": "preprocess",
    "run_preprocess": "preprocess",
    "main_preprocess": "preprocess",
    "BlendedDataset": "blend",
    "PretrainingSampler": "sampler",
    "build_pretrain_dataset": "builder",
    "build_pretrain_dataloader": "builder",
    "generate_stories": "synthetic_corpus",
    "build_default_assets": "synthetic_corpus",
    "builtin_corpus_path": "synthetic_corpus",
    "builtin_tokenizer_dir": "synthetic_corpus",
}

__all__ = ["DataError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
