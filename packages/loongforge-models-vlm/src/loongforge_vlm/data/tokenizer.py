"""The ``hf_vision`` tokenizer type: an HF tokenizer directory plus the vision tokens it lacks.

Qwen2.5-VL tokenizers already have ``<|vision_start|>``, ``<|image_pad|>`` and ``<|vision_end|>``;
a text-only tokenizer (e.g. the shipped ``builtin:tiny_stories``) gets them appended as special
tokens, so the model's ``vocab_size`` must leave room for them (checked by the trainer).
"""

from __future__ import annotations

from loongforge.data.tokenizer import load_tokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def load_vision_tokenizer(path):
    tokenizer = load_tokenizer(path)
    vocab = tokenizer.get_vocab()
    missing = [t for t in VISION_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer
