"""Training, saving and loading tokenizers; the vocab-size guard."""

from __future__ import annotations

import json

import pytest
from loongforge.data.errors import DataError
from loongforge.data.tokenizer import (
    EOS_TOKEN,
    check_vocab,
    encode_documents,
    load_tokenizer,
    train_bpe_tokenizer,
)


def test_train_save_load_round_trip(tokenizer_dir, tokenizer, stories):
    assert (tokenizer_dir / "tokenizer.json").is_file()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == config["pad_token"] == EOS_TOKEN
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert 300 < len(tokenizer) <= 600
    for text in stories[:20] + ["Unseen words: zebra, 42 and ü€ 🙂!"]:
        ids = tokenizer(text)["input_ids"]
        assert EOS_TOKEN not in tokenizer.convert_ids_to_tokens(ids)  # no specials added implicitly
        assert tokenizer.decode(ids) == text  # byte level: lossless, no unknown token


def test_training_is_deterministic(tmp_path, stories):
    a = train_bpe_tokenizer(stories, 400, tmp_path / "a")
    b = train_bpe_tokenizer(iter(stories), 400, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_encode_documents_appends_eos(tokenizer):
    docs = encode_documents(tokenizer, ["Tom was happy.", "Lily ran."])
    assert [d[-1] for d in docs] == [tokenizer.eos_token_id] * 2
    assert docs[0][:-1] == tokenizer.encode("Tom was happy.", add_special_tokens=False)


def test_check_vocab_refuses_too_small_model(tokenizer):
    check_vocab(tokenizer, len(tokenizer))
    check_vocab(tokenizer, 1024)
    with pytest.raises(DataError) as err:
        check_vocab(tokenizer, len(tokenizer) - 1)
    assert str(len(tokenizer)) in str(err.value) and str(len(tokenizer) - 1) in str(err.value)


def test_load_missing_directory_is_clear(tmp_path):
    with pytest.raises(DataError, match="tokenizer directory not found.*nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
