"""The shipped corpus and tokenizer: present, loadable, reproducible, covering each other."""

from __future__ import annotations

import json
from importlib import resources

from loongforge.data.documents import read_texts
from loongforge.data.synthetic_corpus import (
    build_default_assets,
    builtin_corpus_path,
    builtin_tokenizer_dir,
    generate_stories,
    write_corpus,
)
from loongforge.data.tokenizer import load_tokenizer


def test_assets_are_package_resources():
    root = resources.files("loongforge.assets")
    assert root.joinpath("tiny_stories.jsonl").is_file()
    assert root.joinpath("tokenizer", "tokenizer.json").is_file()
    assert builtin_corpus_path("tiny_stories").stat().st_size <= 2_200_000


def test_shipped_corpus_regenerates_identically(tmp_path):
    regenerated = write_corpus(tmp_path / "tiny_stories.jsonl")
    assert regenerated.read_bytes() == builtin_corpus_path().read_bytes()


def test_build_default_assets_reproduces_every_shipped_file(tmp_path):
    out = build_default_assets(tmp_path / "assets")
    shipped = builtin_corpus_path().parent
    for name in ("tiny_stories.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (out / name).read_bytes() == (shipped / name).read_bytes(), name
    assert builtin_tokenizer_dir() == shipped / "tokenizer"


def test_shipped_tokenizer_covers_corpus():
    texts, stats = read_texts(builtin_corpus_path())
    assert stats.documents >= 2000 and stats.skipped == 0
    tok = load_tokenizer("builtin:tiny_stories")
    assert tok.eos_token_id is not None and len(tok) <= 2048
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert tok.batch_decode(ids) == texts  # lossless on every document
    assert tok.unk_token_id is None
    assert sum(map(len, ids)) / sum(map(len, texts)) < 0.3  # words are single tokens, not bytes


def test_stories_are_simple_and_deterministic():
    a, b = generate_stories(50, seed=3), generate_stories(50, seed=3)
    assert a == b and a != generate_stories(50, seed=4)
    for text in a:
        assert text.isascii() and text[0].isupper() and text.rstrip()[-1] in '.!"'
        assert "{" not in text and "}" not in text  # every template slot filled
        json.dumps({"text": text})
