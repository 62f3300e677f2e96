"""Turn the ``data:`` section of a run config into train/validation datasets and data loaders.

Config keys (all but ``paths`` optional)::

    data:
      format: text            # text: .jsonl/.json/.parquet files (tokenized in memory at start)
                              # indexed: megatron .bin/.idx prefixes from `loongforge data preprocess`
      paths: [builtin:tiny_stories]   # files/dirs/globs (text) or prefixes (indexed); one dataset each
      weights: null           # blend weights, one per path; null = proportional to dataset size
      text_field: text        # JSON key / parquet column (format: text)
      on_error: raise         # raise | skip malformed records (format: text)
      valid_fraction: 0.0     # hold out this fraction of each path's documents for validation
      valid_paths: null       # or: separate validation data (same format); excludes valid_fraction
      shuffle: true           # seeded document shuffle before packing
      num_samples: null       # size of the training blend; null = sum of the datasets' samples

``builtin:tiny_stories`` names the corpus shipped with the package. Unknown keys are ignored, so
other components may keep their own options (e.g. loader workers) in the same section.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from loongforge.data.blend import BlendedDataset
from loongforge.data.documents import read_texts
from loongforge.data.errors import DataError
from loongforge.data.packing import PackedTextDataset, TokenizedCorpus, collate, split_documents
from loongforge.data.sampler import PretrainingSampler
from loongforge.data.tokenizer import BUILTIN_PREFIX, eos_token_id, pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "format": "text",
    "paths": None,
    "weights": None,
    "text_field": "text",
    "on_error": "raise",
    "valid_fraction": 0.0,
    "valid_paths": None,
    "shuffle": True,
    "num_samples": None,
}
FORMATS = ("text", "indexed")


def _as_dict(data_cfg: Any) -> dict[str, Any]:
    try:  # OmegaConf comes with the config system; plain dicts work without it
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    except ImportError:
        pass
    if not isinstance(data_cfg, Mapping):
        raise DataError(f"data config must be a mapping, got {type(data_cfg).__name__}")
    # An explicit null means "use the default".
    cfg = {**DEFAULTS, **{k: v for k, v in data_cfg.items() if v is not None}}
    if cfg["format"] not in FORMATS:
        raise DataError(f"data.format must be one of {FORMATS}, got {cfg['format']!r}")
    if cfg["on_error"] not in ("raise", "skip"):
        raise DataError(f"data.on_error must be 'raise' or 'skip', got {cfg['on_error']!r}")
    if cfg["valid_paths"] and cfg["valid_fraction"]:
        raise DataError("set either data.valid_fraction or data.valid_paths, not both")
    return cfg


def _resolve_builtin(path: str) -> str:
    if path.startswith(BUILTIN_PREFIX):
        from loongforge.data.synthetic_corpus import builtin_corpus_path

        return str(builtin_corpus_path(path[len(BUILTIN_PREFIX) :]))
    return path


def _path_list(value: Any, key: str) -> list[str]:
    if value is None or (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 0):
        raise DataError(f"data.{key} is empty: give at least one path (or builtin:tiny_stories)")
    items = [value] if isinstance(value, str) else list(value)
    return [_resolve_builtin(str(p)) for p in items]


def _load_component(cfg: dict, path: str, tokenizer, seq_length: int, seed: int, valid_fraction: float):
    """One path -> (train dataset, valid dataset or None), split at document level."""
    if cfg["format"] == "text":
        texts, stats = read_texts(path, cfg["text_field"], cfg["on_error"])
        if stats.skipped:
            logger.warning("%s: %s", path, stats.summary())
        corpus = TokenizedCorpus.from_texts(texts, tokenizer)
        del texts
        train_ids, valid_ids = split_documents(len(corpus), valid_fraction, seed)

        def make(ids):
            return PackedTextDataset(
                corpus, tokenizer, seq_length, seed=seed, shuffle=cfg["shuffle"], doc_ids=ids
            )

    else:
        from loongforge.data.indexed import (
            PackedIndexedDataset,
            indexed_document_lengths,
            open_indexed_dataset,
        )

        num_docs = len(indexed_document_lengths(open_indexed_dataset(path))[1])
        train_ids, valid_ids = split_documents(num_docs, valid_fraction, seed)
        pad = pad_token_id(tokenizer)

        def make(ids):
            return PackedIndexedDataset(path, seq_length, pad, seed=seed, shuffle=cfg["shuffle"], doc_ids=ids)

    train = make(train_ids)
    valid = make(valid_ids) if len(valid_ids) else None
    logger.info("data %s: %d train samples, %d valid samples", path, len(train), len(valid) if valid else 0)
    return train, valid


def _blend(datasets: list, weights: list | None, size: int | None, seed: int):
    if len(datasets) == 1 and size is None:
        return datasets[0]
    weights = [len(d) for d in datasets] if weights is None else list(weights)
    return BlendedDataset(datasets, weights, size or sum(len(d) for d in datasets), seed)


def build_pretrain_dataset(
    data_cfg: Any, tokenizer: PreTrainedTokenizerBase, seq_length: int, seed: int = 0
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """Build ``(train_dataset, valid_dataset_or_None)`` of packed samples (see :mod:`.packing`).

    Each path becomes one dataset; several are blended by ``weights``. Validation data comes from
    ``valid_fraction`` (documents held out of every path, blended with the same weights) or from
    ``valid_paths`` (all of it, mixed in proportion to size).
    """
    cfg = _as_dict(data_cfg)
    eos_token_id(tokenizer)  # fail early: packing needs an EOS to delimit documents
    paths = _path_list(cfg["paths"], "paths")
    weights = None if cfg["weights"] is None else [float(w) for w in cfg["weights"]]
    if weights is not None and len(weights) != len(paths):
        raise DataError(f"data.weights has {len(weights)} entries for {len(paths)} paths; need one per path")
    fraction = float(cfg["valid_fraction"])
    parts = [_load_component(cfg, p, tokenizer, seq_length, seed, fraction) for p in paths]
    train = _blend([t for t, _ in parts], weights, cfg["num_samples"], seed)

    valid = None
    if cfg["valid_paths"]:
        vsets = [
            _load_component(cfg, p, tokenizer, seq_length, seed, 0.0)[0]
            for p in _path_list(cfg["valid_paths"], "valid_paths")
        ]
        valid = _blend(vsets, None, None, seed)
    elif fraction > 0:
        keep = [j for j, (_, v) in enumerate(parts) if v is not None]
        valid = _blend(
            [parts[j][1] for j in keep], None if weights is None else [weights[j] for j in keep], None, seed
        )
    return train, valid


def build_pretrain_dataloader(
    dataset: torch.utils.data.Dataset,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_samples: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    total_samples: int | None = None,
    num_workers: int = 0,
    collate_fn=collate,
) -> torch.utils.data.DataLoader:
    """A DataLoader of this rank's ``[micro_batch_size, S]`` batches, resumable at ``consumed_samples``
    (``collate_fn``: samples -> micro-batch, for datasets whose samples carry more than tokens)."""
    sampler = PretrainingSampler(
        len(dataset), micro_batch_size, global_batch_size, dp_rank, dp_size,
        consumed_samples=consumed_samples, seed=seed, shuffle=shuffle, total_samples=total_samples,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )  # fmt: skip
