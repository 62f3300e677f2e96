from __future__ import annotations

from dataclasses import dataclass

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.family import FamilySpec


@dataclass(frozen=True)
class MiMoFamily(FamilySpec):
    def hf_extra(self, args: DenseArgs) -> dict:
        return {
            "attention_bias": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": args.num_hidden_layers,
        }


FAMILY = MiMoFamily(
    name="mimo",
    hf_model_types=("mimo",),
    hf_model_type="mimo",
    hf_architecture="MiMoForCausalLM",
    config_groups=("mimo",),
    rules="loongforge_llm.mimo.weights:rules",
    qkv_bias=True,
    hf_reference=None,
    supported=False,
    ignore_hf=(r"model\.mtp_layers\..*",),
    hf_fields=("num_nextn_predict_layers",),  # the MTP layers, which are not built
    description="EXPERIMENTAL MiMo-7B main model on the Qwen2 layout; MTP layers not loaded; "
    "no HF reference class - parity not tested",
)
