"""Every HF ``config.json`` field of the dense families: read, knowingly ignored, or refused.

A field that changes what the model computes and that we do not implement must fail by name
rather than train a different model (a Qwen2 config with ``use_sliding_window: true`` trained
with full attention before). ``tests/test_hf_fields.py`` walks the fields of each supported
transformers config class (``LlamaConfig``, ``Qwen2Config``, ``Qwen3Config``) and fails when one
is in none of the sets below, so the lists stay complete. A key in none of them is refused as
unknown, with the closest known names (``model.hiden_size``). No torch import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

#: read by ``common.args.parse_model_args``
USED = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias", "hidden_act", "initializer_range",
    "attention_dropout", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "model_type",
})

#: present in HF configs, no effect on the parameters or on training's forward/backward
HARMLESS = frozenset({
    # PretrainedConfig bookkeeping, outputs and generation settings
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16", "tf_legacy_loss", "id2label",
    "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "is_decoder", "tie_encoder_decoder",
    "cross_attention_hidden_size", "_attn_implementation_autoset", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "auto_map",
    # only used by modules HF's causal LMs of these families do not run (BERT-style chunking)
    "chunk_size_feed_forward",
    # LLaMA: splits the matmuls of the pre-training run into slices; same function (transformers 5: unused)
    "pretraining_tp",
    # the sliding window's size and layers: no effect while it is off (refused below when on)
    "sliding_window", "max_window_layers",
})


def _all_full_attention(value: Any) -> bool:
    return value is None or all(t == "full_attention" for t in value)


#: field -> (is this value fine?, what we do not implement)
REFUSED_UNLESS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_sliding_window": (lambda v: not v, "sliding-window attention is not implemented (full attention only)"),
    "layer_types": (_all_full_attention, "only 'full_attention' layers are implemented"),
    "pruned_heads": (lambda v: not v, "pruned attention heads are not supported"),
    "is_encoder_decoder": (lambda v: not v, "encoder-decoder models are not supported"),
    "add_cross_attention": (lambda v: not v, "cross-attention is not supported"),
}

#: our own keys (see ``loongforge_llm.provider``)
OWN = frozenset({"family", "pretrained", "fusions", "use_cpu_initialization", "transformer_config"})


def known_fields(extra: Iterable[str] = ()) -> frozenset[str]:
    return USED | HARMLESS | frozenset(REFUSED_UNLESS) | OWN | frozenset(extra)


def check_fields(section: dict[str, Any], extra: Iterable[str] = (), error: type[Exception] = ValueError) -> None:
    """Refuse unknown keys (with the closest known names) and fields we do not implement."""
    known = known_fields(extra)
    for key, value in section.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise error(f"unknown config key 'model.{key}' for the {section.get('family')} family.{hint}")
        if key in REFUSED_UNLESS and not REFUSED_UNLESS[key][0](value):
            raise error(f"config key 'model.{key}': {value!r} is not supported: {REFUSED_UNLESS[key][1]}")
