"""What the core asks of a model family: a config for megatron-core, a module, a weight map.

A family registers ``ModelFamily(builder="pkg.module:Provider")``; the core calls
``Provider(model_cfg)`` with the composed ``model`` config section and then the methods of
:class:`ModelProvider` (docs/architecture.md, "The model-provider contract"). No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

    from loongforge.backend import Backend


@dataclass(frozen=True)
class RunSettings:
    """Training settings a provider folds into its ``TransformerConfig``."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    #: expert parallelism (MoE): experts split over ``ep`` ranks, each expert over ``etp`` ranks
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    bf16: bool = False
    seq_length: int = 2048
    recompute_granularity: str | None = None  # None | "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block" (full recompute only)
    recompute_num_layers: int | None = None
    #: pad the vocab to a multiple of this times ``tp``
    make_vocab_size_divisible_by: int = 128


def transformer_layer_spec(config: TransformerConfig, backend: Backend, model_cfg: Any, plugins: Any = None) -> Any:
    """The transformer-layer ``ModuleSpec`` a provider builds its layers from: the answer of the
    ``loongforge_layer_spec`` hook (a plugin's spec for this model, else the backend's, which the
    core's ``trylast`` default returns). Every provider takes its spec from here, never from
    ``backend.layer_spec`` directly, so that a plugin's spec applies to every model family."""
    if plugins is None:
        from loongforge.plugins import get_plugin_manager

        plugins = get_plugin_manager()
    spec = plugins.hook.loongforge_layer_spec(backend=backend, config=config, model_cfg=model_cfg)
    return spec if spec is not None else backend.layer_spec(config, model_cfg)


@runtime_checkable
class ModelProvider(Protocol):
    """The model-family contract: what the core (trainer, ``generate``, ``export-lora``) and the
    converters (``loongforge-ckpt``) call. ``ModelFamily.builder`` names the class; it is called as
    ``Provider(model_cfg)`` with the composed ``model`` config section (an OmegaConf node) and must
    validate it there, raising ``loongforge.config.ConfigError`` naming the key (an unknown key
    included). Reference implementation: ``loongforge_llm.provider.LLMProvider``; a family that
    only differs in config defaults and weight rules reuses it (``loongforge_llm.dense``).

    Who calls what, in order:

    * trainer / generate: ``transformer_config(run)`` once, ``padded_vocab_size(run)``, then
      ``build(...)`` once per virtual pipeline stage of the rank; with ``model.pretrained``,
      ``load_hf_weights(chunk, get_hf_tensor)`` on each built chunk;
    * resuming: ``architecture()`` if the provider has it (else the section is compared as written);
    * converters (``hf-to-mcore``, ``mcore-to-hf``, ``checkpoint.save_hf``): ``transformer_config``,
      ``build`` (on the meta device), ``weight_mapping(run)``, ``hf_config()``.
    """

    def __init__(self, model_cfg: Any) -> None: ...

    def transformer_config(self, run: RunSettings) -> TransformerConfig:
        """The megatron-core config for this model under ``run``'s parallel/precision settings
        (raise ``ConfigError`` when the model does not fit them)."""

    def padded_vocab_size(self, run: RunSettings) -> int:
        """Embedding rows after padding for TP (>= the tokenizer's vocabulary)."""

    def build(
        self,
        config: TransformerConfig,
        run: RunSettings,
        *,
        backend: Backend,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None = None,
    ) -> Any:
        """One model chunk (a pipeline stage, or a virtual stage ``vp_stage``), a torch module with
        ``.config`` = ``config``, its layers from :func:`transformer_layer_spec`.

        ``forward(input_ids [b, s], position_ids [b, s], attention_mask, labels=None)`` returns,
        on the last stage, the per-token loss [b, s] (fp32) when ``labels`` are given, else the
        logits [b, s, padded vocab]; on other stages the hidden states [s, b, h] (GPTModel's
        contract, which megatron-core's pipeline schedules rely on).
        """

    def load_hf_weights(self, chunk: Any, get_hf_tensor: Any) -> None:
        """Load this chunk's part (its pipeline stage, its TP slice) of an HF checkpoint;
        ``get_hf_tensor(name)`` returns one HF tensor; raise ``MappingError`` naming the tensor."""

    def weight_mapping(self, run: RunSettings | None = None) -> Any:
        """The HF <-> ours parameter mapping (``loongforge.weight_mapping.WeightMapping``)."""

    def hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict describing this model (for export)."""
