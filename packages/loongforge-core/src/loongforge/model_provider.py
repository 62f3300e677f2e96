"""What the trainer asks of a model family: a config for megatron-core, a module, a weight map.

A family registers ``ModelFamily(builder="pkg.module:Provider")``; the trainer calls
``Provider(model_cfg)`` with the composed ``model`` config section and then the methods below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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


class ModelProvider(Protocol):
    """Built from the ``model`` config section; see ``loongforge_llm`` for the reference one."""

    def transformer_config(self, run: RunSettings) -> TransformerConfig:
        """The megatron-core config for this model under ``run``'s parallel/precision settings."""

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
        """One model chunk (a pipeline stage, or a virtual stage ``vp_stage``).

        Its ``forward(input_ids, position_ids, attention_mask, labels=...)`` returns the
        per-token loss [b, s] on the last stage and hidden states elsewhere, as GPTModel does.
        """

    def load_hf_weights(self, chunk: Any, get_hf_tensor: Any) -> None:
        """Load this chunk's part (its pipeline stage, its TP slice) of an HF checkpoint;
        ``get_hf_tensor(name)`` returns one HF tensor."""

    def weight_mapping(self) -> Any:
        """The HF <-> ours parameter mapping (``loongforge.weight_mapping.WeightMapping``)."""

    def hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict describing this model (for export)."""
