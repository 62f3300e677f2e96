"""What distinguishes one dense decoder family from another (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loongforge_llm.common.args import DenseArgs, ModelConfigError


@dataclass(frozen=True)
class FamilySpec:
    """One family folder (``llama/``, ``qwen2/``...).

    ``name``: the value of ``model.family``. ``hf_model_types``: HF ``model_type`` values it loads;
    ``hf_model_type``/``hf_architecture``: what an export writes. ``config_groups``: Hydra groups
    (under ``models/``) holding its sizes. ``rules``: ``"module:function"`` returning the weight
    rules, ``fn(args, padded_vocab_size) -> list[Rule]``. ``qkv_bias``: ``True`` when the family
    always has q/k/v biases, ``None`` when ``attention_bias`` decides. ``hf_reference``: the
    ``transformers`` class the parity tests compare against; ``None`` when there is none, in which
    case ``supported`` is ``False``. ``ignore_hf``: regexes of HF tensors knowingly not loaded.
    ``provider``/``moe``: see the fields (MoE families: ``loongforge_llm.moe``).
    ``hf_fields``: config.json fields of this family's own, known to change nothing we build.
    """

    name: str
    hf_model_types: tuple[str, ...]
    hf_model_type: str
    hf_architecture: str
    config_groups: tuple[str, ...]
    rules: str
    qkv_bias: bool | None = None
    qk_norm: bool = False
    hf_reference: str | None = None
    supported: bool = True
    ignore_hf: tuple[str, ...] = ()
    #: HF config.json fields of this family beyond ``common.hf_fields`` (known, harmless)
    hf_fields: tuple[str, ...] = ()
    description: str = ""
    #: the ``ModelProvider`` class (``"module:Class"``) that builds the family
    provider: str = "loongforge_llm.provider:LLMProvider"
    #: a mixture-of-experts family (dense families refuse MoE keys)
    moe: bool = False

    def has_qkv_bias(self, args: DenseArgs) -> bool:
        return True if self.qkv_bias else args.attention_bias

    def validate(self, args: DenseArgs) -> None:
        """Family-specific checks of the parsed ``model`` section."""
        if args.attention_bias and self.qkv_bias is not None and not self.qkv_bias:
            raise ModelConfigError(
                f"config key 'model.attention_bias': the {self.name} family has no attention biases here "
                "(HF applies attention_bias to o_proj too, which megatron-core's layer cannot express)"
            )

    def hf_extra(self, args: DenseArgs) -> dict[str, Any]:
        """Family-specific ``config.json`` fields."""
        return {}
