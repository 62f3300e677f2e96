"""DeepSeek-V3 weights: MLA projections, dense MLP layers, MoE layers (router, grouped experts,
shared experts). The correction bias (a buffer) is handled by the provider."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loongforge.weight_mapping import FusedGateUp, MappingError, Rename, Rule, TiedOutput, VocabRows

from loongforge_llm.common.args import DenseArgs
from loongforge_llm.common.weights import HF_LAYER, OURS_LAYER
from loongforge_llm.moe.args import MoEArgs
from loongforge_llm.moe.weights import moe_layer_rules


@dataclass(frozen=True, kw_only=True)
class PermutedRows(Rename):
    """An HF tensor whose rows are reordered (``ours[k] = hf[perm[k]]``)."""

    perm: tuple[int, ...] = ()

    def combine(self, hf, name, layer=None):
        t = hf[self.hf]
        if t.shape[0] != len(self.perm):
            raise MappingError(f"parameter {name!r}: expected {len(self.perm)} rows, got shape {tuple(t.shape)}")
        return t[list(self.perm)]

    def split(self, full, name):
        inverse = torch.empty(len(self.perm), dtype=torch.long)
        inverse[list(self.perm)] = torch.arange(len(self.perm))
        return {self.hf: full[inverse]}

    def _read_shard(self, hf_slices, tp_rank, tp_size, name):
        return self.shard(self.combine({self.hf: hf_slices[self.hf][:]}, name), tp_rank, tp_size, name)


def rope_interleave_rows(rows_before: int, rope: int) -> list[int]:
    """Row order for a checkpoint WITHOUT HF's ``rope_interleave``: megatron-core's MLA always
    de-interleaves the rope dims (even ones first, then odd ones, as HF's ``rope_interleave``
    does), so such weights are stored interleaved (the inverse order) to come out as they were."""
    deinterleave = [*range(0, rope, 2), *range(1, rope, 2)]
    inverse = [0] * rope
    for k, d in enumerate(deinterleave):
        inverse[d] = k
    return list(range(rows_before)) + [rows_before + j for j in inverse]


def mla_rules(args: DenseArgs, section: dict) -> list[Rule]:
    """The attention projections (``rope_interleave: false`` checkpoints: the rope rows of
    ``q_b_proj``, per head, and of ``kv_a_proj_with_mqa`` reordered, see above)."""
    nope, rope = section["qk_nope_head_dim"], section["qk_rope_head_dim"]
    reorder = not bool(section.get("rope_interleave", True))
    heads = args.num_attention_heads
    q_perm = [h * (nope + rope) + k for h in range(heads) for k in rope_interleave_rows(nope, rope)]
    kv_perm = rope_interleave_rows(section["kv_lora_rank"], rope)
    out: list[Rule] = []
    for h, o in ATTN:
        hf, ours = f"{HF_LAYER}.self_attn.{h}.weight", f"{OURS_LAYER}.self_attention.{o}.weight"
        if reorder and h == "q_b_proj":
            out.append(PermutedRows(hf=hf, ours=ours, perm=tuple(q_perm), tp_dim=0))
        elif reorder and h == "kv_a_proj_with_mqa":
            out.append(PermutedRows(hf=hf, ours=ours, perm=tuple(kv_perm)))
        else:
            out.append(Rename(hf=hf, ours=ours, tp_dim={"q_b_proj": 0, "kv_b_proj": 0, "o_proj": 1}.get(h)))
    return out


ATTN = (("q_a_proj", "linear_q_down_proj"), ("q_a_layernorm", "q_layernorm"), ("q_b_proj", "linear_q_up_proj"),
        ("kv_a_proj_with_mqa", "linear_kv_down_proj"), ("kv_a_layernorm", "kv_layernorm"),
        ("kv_b_proj", "linear_kv_up_proj"), ("o_proj", "linear_proj"))


def rules(args: DenseArgs, moe: MoEArgs, padded_vocab_size: int, *, section: dict, ep_rank: int = 0,
          ep_size: int = 1, etp_rank: int = 0, etp_size: int = 1) -> list[Rule]:
    vocab = {"vocab_size": args.vocab_size, "padded_vocab_size": padded_vocab_size}
    moe_layers = frozenset(i for i, is_moe in enumerate(moe.moe_layers) if is_moe)
    dense_layers = frozenset(range(args.num_hidden_layers)) - moe_layers
    out: list[Rule] = [
        VocabRows(hf="model.embed_tokens.weight", ours="embedding.word_embeddings.weight", **vocab),
        Rename(hf=f"{HF_LAYER}.input_layernorm.weight", ours=f"{OURS_LAYER}.input_layernorm.weight"),
        Rename(hf=f"{HF_LAYER}.post_attention_layernorm.weight", ours=f"{OURS_LAYER}.pre_mlp_layernorm.weight"),
        Rename(hf="model.norm.weight", ours="decoder.final_layernorm.weight", stage="head"),
    ]
    out += mla_rules(args, section)
    if dense_layers:
        out += [FusedGateUp(hf_gate=f"{HF_LAYER}.mlp.gate_proj.weight", hf_up=f"{HF_LAYER}.mlp.up_proj.weight",
                            ours=f"{OURS_LAYER}.mlp.linear_fc1.weight", only_layers=dense_layers),
                Rename(hf=f"{HF_LAYER}.mlp.down_proj.weight", ours=f"{OURS_LAYER}.mlp.linear_fc2.weight", tp_dim=1,
                       only_layers=dense_layers)]
    out += moe_layer_rules(f"{HF_LAYER}.mlp", f"{OURS_LAYER}.mlp", num_experts=moe.num_experts, moe_layers=moe_layers,
                           ep_rank=ep_rank, ep_size=ep_size, etp_rank=etp_rank, etp_size=etp_size,
                           grouped=moe.options.grouped_gemm)
    shared = f"{HF_LAYER}.mlp.shared_experts"
    out += [FusedGateUp(hf_gate=f"{shared}.gate_proj.weight", hf_up=f"{shared}.up_proj.weight",
                        ours=f"{OURS_LAYER}.mlp.shared_experts.linear_fc1.weight", only_layers=moe_layers),
            Rename(hf=f"{shared}.down_proj.weight", ours=f"{OURS_LAYER}.mlp.shared_experts.linear_fc2.weight",
                   tp_dim=1, only_layers=moe_layers)]
    if args.tie_word_embeddings:
        out.append(TiedOutput(hf="model.embed_tokens.weight", ours="output_layer.weight", **vocab))
    else:
        out.append(VocabRows(hf="lm_head.weight", ours="output_layer.weight", stage="head", **vocab))
    return out
