"""Tokenizer loading, training and the one encoding rule shared by every dataset.

Why a single :func:`encode_documents`: the in-memory packer and the multiprocess ``.bin/.idx``
preprocessor must produce the *same* token stream for the same text, so both call this function
(no special tokens added by the tokenizer, one EOS appended per document).

Tokenizers are only ever loaded from local directories (``local_files_only=True``); training
machines often have no network, and a silent hub download would make runs irreproducible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loongforge.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The document separator / end-of-text token of tokenizers trained here (Qwen/GPT-2 spelling).
EOS_TOKEN = "<|endoftext|>"
#: Reserved for chat-style fine-tuning; unused by pre-training.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
#: Prefix naming tokenizers shipped inside the package, e.g. ``builtin:tiny_stories``.
BUILTIN_PREFIX = "builtin:"


def resolve_tokenizer_dir(path: str | os.PathLike) -> Path:
    """Map ``builtin:tiny_stories`` to the shipped tokenizer directory; other paths are returned as is."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        from loongforge.data.synthetic_corpus import builtin_tokenizer_dir

        return builtin_tokenizer_dir(text[len(BUILTIN_PREFIX) :])
    return Path(path)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer from a local directory (or ``builtin:NAME``); never from the hub."""
    directory = resolve_tokenizer_dir(path)
    if not directory.is_dir():
        raise DataError(f"tokenizer directory not found: {directory}")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(
            f"{directory} is not a tokenizer directory (no tokenizer.json or tokenizer_config.json)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is wrong
        raise DataError(f"cannot load tokenizer from {directory}: {e}") from e


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id appended after every document; a tokenizer without one cannot delimit documents."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} defines no eos_token")
    return int(eos)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id placed in padded positions (always loss-masked, so any valid id works); falls back to EOS."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize a batch of documents without tokenizer-added specials and append EOS to each."""
    eos = eos_token_id(tokenizer)
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [list(x) + [eos] for x in ids]


def check_vocab(tokenizer: PreTrainedTokenizerBase, model_vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding table does not have."""
    size = len(tokenizer)
    if size > int(model_vocab_size):
        raise DataError(
            f"tokenizer vocabulary ({size} tokens, incl. added tokens) exceeds the model's vocab_size "
            f"({model_vocab_size}); raise model vocab_size to at least {size} or use another tokenizer"
        )


def train_bpe_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1 << 20,
) -> Path:
    """Train a byte-level BPE tokenizer and save a directory loadable by :func:`load_tokenizer`.

    Byte-level means every string is encodable (no unknown token). The output is deterministic for
    a given input: the files are written by us with sorted keys (not by ``save_pretrained``, whose
    output varies with the transformers version).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [EOS_TOKEN, *CHAT_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} for byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d for d in documents), trainer=trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Tokenizer.to_str() is a canonical serialisation; re-dump with sorted keys for stable bytes.
    (out / "tokenizer.json").write_text(
        json.dumps(json.loads(tok.to_str()), indent=1, ensure_ascii=False, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
