"""``LLMProvider``: dense decoder families (LLaMA, Qwen) as megatron-core ``GPTModel``.

The ``model`` config section uses HuggingFace ``config.json`` names (see
``loongforge_llm.common.args``) plus ``family``. The provider maps it onto a
``TransformerConfig`` (GQA, RMSNorm, SwiGLU, no linear biases except Qwen2's q/k/v bias,
Qwen3's QK-norm), builds the model chunks and gives the HF <-> ours weight mapping.

Optional keys of the section, beyond the HF ones:

* ``use_cpu_initialization`` (default: true when no CUDA device is visible);
* ``fusions``: ``auto`` (default; megatron-core's jit-fused bias+SwiGLU and bias+dropout+add on
  CUDA, nothing on CPU), ``false`` (none), ``true`` (those plus Transformer Engine's RoPE fusion and
  gradient-accumulation fusion, which need TE and megatron's DDP);
* ``transformer_config``: a dict of extra ``TransformerConfig`` fields applied last.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from loongforge.model_provider import RunSettings
from loongforge.registry import load_object

from loongforge_llm.common.args import (
    DenseArgs,
    ModelConfigError,
    num_parameters,
    parse_model_args,
    to_plain_dict,
)
from loongforge_llm.common.family import FamilySpec
from loongforge_llm.common.hf_fields import check_fields
from loongforge_llm.families import family_for_model_type, get_family
from loongforge_llm.moe.args import has_moe_keys

if TYPE_CHECKING:
    import torch
    from loongforge.weight_mapping import WeightMapping
    from megatron.core.transformer import TransformerConfig

__all__ = ["LLMProvider", "model_cfg_from_hf_config", "provider_for"]


class _DropGPTModelDeprecation(logging.Filter):
    """megatron-core 0.19.2 logs a deprecation warning for every GPTModel built (once per model
    chunk); the choice is deliberate and documented on :class:`LLMProvider`, so keep logs quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("GPTModel IS DEPRECATED")


def _quiet_gptmodel_deprecation() -> None:
    log = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropGPTModelDeprecation) for f in log.filters):
        log.addFilter(_DropGPTModelDeprecation())


def _pad_vocab(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class LLMProvider:
    """``loongforge.model_provider.ModelProvider`` for the dense decoder families.

    Builds megatron-core's ``GPTModel``. megatron-core 0.19.2 marks ``GPTModel`` deprecated in
    favour of ``HybridModel``; we stay on ``GPTModel`` because it is the model that takes a
    transformer-layer ``ModuleSpec`` such as LoongForge's local spec with SDPA core attention
    (``loongforge.modules.layer_spec``) and the specs backends return from
    ``loongforge_layer_spec``; moving is a change of this class only.
    """

    #: the family this provider class is bound to (``loongforge_llm.dense.dense_provider``); None:
    #: one of this package's families, by ``model.family``
    family_spec: FamilySpec | None = None

    def __init__(self, model_cfg: Any, *, plugins: Any = None):
        self.model_cfg = model_cfg
        self._section = to_plain_dict(model_cfg)
        spec = self.family_spec
        if spec is not None:
            self._section.setdefault("family", spec.name)
            if self._section["family"] != spec.name:
                raise ModelConfigError(f"config key 'model.family': {self._section['family']!r} is built by the "
                                       f"{spec.name!r} provider")
        elif self._section.get("family") is not None:  # an unknown family fails naming the known ones
            spec = get_family(str(self._section["family"]))
        moe_keys = has_moe_keys(self._section)
        if spec is not None and moe_keys and not spec.moe:  # before the unknown-key check: the better hint
            raise ModelConfigError(
                f"config key 'model.{moe_keys[0]}': the {spec.name} family is dense; MoE keys "
                f"({', '.join(moe_keys)}) need an MoE family (e.g. model.family=qwen3_moe)")
        if spec is not None:
            check_fields(self._section, spec.hf_fields, ModelConfigError)
        args = parse_model_args(self._section)
        self.family = spec or get_family(args.family)
        self.family.validate(args)
        self.qkv_bias = self.family.has_qkv_bias(args)
        #: the parsed section; ``attention_bias`` normalised to "has q/k/v biases" for the family
        self.args: DenseArgs = dataclasses.replace(args, attention_bias=self.qkv_bias)
        self.qk_norm = self.family.qk_norm
        self._plugins = plugins
        self._run: RunSettings | None = None

    def __repr__(self) -> str:
        a = self.args
        return f"LLMProvider({a.family}: {a.num_hidden_layers} layers, hidden {a.hidden_size}, vocab {a.vocab_size})"

    # --- sizes ---------------------------------------------------------------------------------
    def padded_vocab_size(self, run: RunSettings | None = None) -> int:
        """``vocab_size`` rounded up to ``make_vocab_size_divisible_by * tp``.

        The extra rows of the embedding and output layer are zero when loaded from HF and are
        dropped on export; they never change the logits of real tokens
        (``logits[..., :vocab_size]``), only add entries after them, which the loss masks out
        (``common.model.PositionIdsGPTModel.real_vocab_size``).
        """
        run = run or self._run or RunSettings()
        return _pad_vocab(self.args.vocab_size, max(1, run.make_vocab_size_divisible_by) * run.tp)

    def num_parameters(self, *, padded: RunSettings | None = None) -> int:
        """Parameter count from the config (HF count; with ``padded``, our padded embedding)."""
        vocab = self.padded_vocab_size(padded) if padded is not None else None
        return num_parameters(self.args, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, vocab_size=vocab)

    def architecture(self) -> dict[str, Any]:
        """What fixes the parameters and the computed function, normalised (an absent ``head_dim``
        is ``hidden_size / num_attention_heads``): resuming compares it with the checkpoint's.
        Not in it: initialisation, dropout, token ids, ``max_position_embeddings`` (RoPE needs
        no table; ``llama3`` scaling keeps its own ``original_max_position_embeddings``)."""
        a = dataclasses.asdict(self.args)
        for key in ("initializer_range", "attention_dropout", "extra", "max_position_embeddings"):
            a.pop(key)
        return {**a, "qk_norm": self.qk_norm}

    # --- megatron-core -------------------------------------------------------------------------
    def _fusion_flags(self, on_cuda: bool) -> dict[str, bool]:
        mode = self._section.get("fusions", "auto")
        if mode not in ("auto", True, False):
            raise ModelConfigError(f"config key 'model.fusions' must be auto, true or false, got {mode!r}")
        jit = bool(on_cuda) if mode == "auto" else bool(mode)
        te = mode is True
        return {
            "bias_activation_fusion": jit,
            "bias_dropout_fusion": jit,
            "masked_softmax_fusion": False,  # SDPA core attention has no separate softmax
            "persist_layer_norm": False,
            "apply_rope_fusion": te,
            "gradient_accumulation_fusion": te,
        }

    def transformer_config(self, run: RunSettings) -> TransformerConfig:
        import torch
        import torch.nn.functional as F

        self._run = run
        a = self.args
        on_cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if run.bf16 else torch.float32
        cpu_init = self._section.get("use_cpu_initialization")
        fields: dict[str, Any] = dict(
            num_layers=a.num_hidden_layers,
            hidden_size=a.hidden_size,
            ffn_hidden_size=a.intermediate_size,
            num_attention_heads=a.num_attention_heads,
            num_query_groups=a.num_key_value_heads,
            kv_channels=a.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=a.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
            hidden_dropout=0.0,
            attention_dropout=a.attention_dropout,
            apply_query_key_layer_scaling=False,
            attention_softmax_in_fp32=True,
            init_method_std=a.initializer_range,
            bf16=run.bf16,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            tensor_model_parallel_size=run.tp,
            pipeline_model_parallel_size=run.pp,
            virtual_pipeline_model_parallel_size=run.vpp,
            context_parallel_size=run.cp,
            sequence_parallel=run.sequence_parallel,
            recompute_granularity=run.recompute_granularity,
            recompute_method=run.recompute_method,
            recompute_num_layers=run.recompute_num_layers,
            use_cpu_initialization=(not on_cuda) if cpu_init is None else bool(cpu_init),
            **self._fusion_flags(on_cuda),
        )
        fields.update(self.extra_config_fields(run))
        fields.update(self._section.get("transformer_config") or {})
        try:
            return self.config_class()(**fields)
        except (AssertionError, ValueError) as exc:
            raise ModelConfigError(
                f"{self.args.family} model (hidden {a.hidden_size}, {a.num_attention_heads} heads, "
                f"{a.num_key_value_heads} KV heads, {a.num_hidden_layers} layers) does not fit the run "
                f"(tp={run.tp}, pp={run.pp}, vpp={run.vpp}, cp={run.cp}): {exc}"
            ) from exc

    def config_class(self) -> type:
        """The megatron-core config class (e.g. ``MLATransformerConfig`` for latent attention)."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig

    def extra_config_fields(self, run: RunSettings) -> dict[str, Any]:
        """``TransformerConfig`` fields a subclass adds (e.g. the MoE ones); dense: none."""
        return {}

    def layer_spec(self, config: TransformerConfig, backend: Any, vp_stage: int | None = None) -> Any:
        """The layer spec from the ``loongforge_layer_spec`` hook (default: ``backend.layer_spec``);
        ``vp_stage``: the virtual pipeline stage being built (unused for dense models)."""
        from loongforge.model_provider import transformer_layer_spec

        return transformer_layer_spec(config, backend, self.model_cfg, self._plugins)

    def build(
        self,
        config: TransformerConfig,
        run: RunSettings,
        *,
        backend: Any,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        model_class: type | None = None,
    ):
        """One ``GPTModel`` chunk (RoPE from ``position_ids``: ``common.model``). RoPE scaling is
        installed as exact HF frequencies (see ``loongforge_llm.common.rope`` for why megatron-core's
        own is not used). ``model_class``: a ``PositionIdsGPTModel`` subclass to build instead
        (e.g. the VLM package's multimodal-RoPE model)."""
        from loongforge_llm.common.model import PositionIdsGPTModel
        from loongforge_llm.common.rope import install_inv_freq, inv_freq

        self._run = run
        a = self.args
        _quiet_gptmodel_deprecation()
        model = (model_class or PositionIdsGPTModel)(
            config=config,
            transformer_layer_spec=self.layer_spec(config, backend, vp_stage=vp_stage),
            vocab_size=self.padded_vocab_size(run),
            max_sequence_length=max(a.max_position_embeddings, run.seq_length),
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=a.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=a.rope_theta,
            rope_scaling=False,
            vp_stage=vp_stage,
        )
        if a.rope_scaling is not None:
            install_inv_freq(model.rotary_pos_emb, inv_freq(a.head_dim, a.rope_theta, a.rope_scaling))
        if self.padded_vocab_size(run) != a.vocab_size:
            model.real_vocab_size = a.vocab_size
        make_processor = getattr(backend, "output_processor", None)  # e.g. the CUDA backend's fused LM-head loss
        if make_processor is not None:
            model.output_processor = make_processor(config)
        return model

    # --- weights -------------------------------------------------------------------------------
    def weight_mapping(self, run: RunSettings | None = None) -> WeightMapping:
        """HF <-> ours mapping, for the vocabulary padding of ``run`` (default: the run this
        provider last configured, else ``RunSettings()``); local-spec names (use
        ``.matching(model.state_dict())`` for a Transformer Engine spec)."""
        from loongforge.weight_mapping import WeightMapping

        rules = load_object(self.family.rules)(self.args, self.padded_vocab_size(run))
        return WeightMapping(rules, self.args.num_hidden_layers, ignore_hf=self.family.ignore_hf)

    def load_hf_weights(
        self,
        model: torch.nn.Module,
        get_hf_tensor,
        *,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        run: RunSettings | None = None,
        mapping: WeightMapping | None = None,
    ) -> None:
        """Load HF tensors into one built chunk (wrappers with ``.module`` such as DDP and
        ``Float16Module`` are looked through). Its pipeline stage and global layer indices are
        read from the chunk, the TP rank from megatron's parallel state unless given.
        ``mapping``: instead of ``self.weight_mapping(run)`` (e.g. one rank's experts)."""
        from loongforge.weight_mapping import MappingError, load_into

        while hasattr(model, "module"):
            model = model.module
        if tp_size is None or tp_rank is None:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
        names = [n for n, _ in model.named_parameters()]
        mapping = (mapping or self.weight_mapping(run)).matching(names)
        layers = [layer.layer_number - 1 for layer in model.decoder.layers]  # layer_number: global, 1-based
        tensors = mapping.hf_to_ours(
            get_hf_tensor, tp_rank, tp_size, layers=layers,
            pre_process=model.pre_process, post_process=model.post_process,
        )
        try:
            load_into(model, tensors)
        except MappingError as exc:
            where = f"model chunk with global layers {layers[0]}..{layers[-1]}" if layers else "model chunk"
            raise MappingError(f"{exc} ({where}, tp rank {tp_rank}/{tp_size}; decoder.layers.N counts from the chunk's first layer)") from exc

    def export_hf_weights(self, model: torch.nn.Module, run: RunSettings | None = None) -> dict[str, torch.Tensor]:
        """HF tensors of a whole model built with tp=1, pp=1."""
        while hasattr(model, "module"):
            model = model.module
        state = {n: p.detach() for n, p in model.named_parameters()}
        mapping = self.weight_mapping(run).matching(state)
        return mapping.ours_to_hf(state.__getitem__)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> dict[str, Any]:
        """A ``model`` section from an HF ``config.json`` dict: the same keys plus ``family`` (this
        class's bound family, else the one whose ``hf_model_types`` has ``model_type``), validated
        (unsupported fields refused), RoPE keys in the legacy ``rope_theta``/``rope_scaling`` form."""
        section = dict(hf_config)
        spec = cls.family_spec or family_for_model_type(str(hf_config.get("model_type")))
        section.setdefault("family", spec.name)
        a = cls(section).args
        section["rope_theta"] = a.rope_theta
        section["rope_scaling"] = dict(a.rope_scaling) if a.rope_scaling else None
        section.pop("rope_parameters", None)
        return section

    def hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` of this model (legacy ``rope_theta``/``rope_scaling`` keys, which
        every transformers version reads)."""
        a, f = self.args, self.family
        cfg: dict[str, Any] = {
            "architectures": [f.hf_architecture],
            "model_type": f.hf_model_type,
            "torch_dtype": self._section.get("torch_dtype") or "bfloat16",
            "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size,
            "num_hidden_layers": a.num_hidden_layers,
            "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_key_value_heads,
            "head_dim": a.head_dim,
            "vocab_size": a.vocab_size,
            "max_position_embeddings": a.max_position_embeddings,
            "rope_theta": a.rope_theta,
            "rope_scaling": dict(a.rope_scaling) if a.rope_scaling else None,
            "rms_norm_eps": a.rms_norm_eps,
            "tie_word_embeddings": a.tie_word_embeddings,
            "hidden_act": a.hidden_act,
            "initializer_range": a.initializer_range,
            "attention_dropout": a.attention_dropout,
            "use_cache": True,
        }
        cfg.update(f.hf_extra(a))
        cfg.update(a.extra)
        return cfg


# --- registry entry points (ModelFamily.builder / from_hf_config) --------------------------------


def provider_for(model_cfg: Any) -> LLMProvider:
    """The provider class of ``model.family`` (``FamilySpec.provider``; e.g. ``MoEProvider``)."""
    from loongforge_llm.families import FAMILIES

    family = to_plain_dict(model_cfg).get("family")
    cls = load_object(FAMILIES[family].provider) if family in FAMILIES else LLMProvider
    return cls(model_cfg)


def model_cfg_from_hf_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``ModelFamily.from_hf_config`` of this package's families (see :meth:`LLMProvider.from_hf_config`),
    through the family's own provider class (an MoE family's reads its MoE fields)."""
    family = family_for_model_type(str(hf_config.get("model_type")))
    return load_object(family.provider).from_hf_config(hf_config)
