"""``GroupedExperts``: the routed experts of a megatron-core ``MoELayer`` as grouped GEMMs.

The weights of all local experts are two parameters (torchtitan's layout, also transformers 5's
in-memory one)::

    fc1_weight  [E_local, 2 * I_local, H]   rows [gate_e; up_e] of each expert
    fc2_weight  [E_local, H, I_local]

where ``I_local = moe_ffn_hidden_size / expert_tensor_parallel_size`` (expert tensor parallelism
splits the gate, the up and the down projection of every expert like megatron-core's
``SequentialMLP`` splits each expert's ``linear_fc1``/``linear_fc2``: rank r holds
``[gate_r; up_r]`` and columns r of the down projection).

The forward takes what megatron-core's token dispatcher hands the experts (``ExpertsInterface``):
tokens sorted by local expert, the token count of each local expert and each token's routing
probability. It is one grouped matrix product for fc1 of all local experts, SwiGLU with the
probability applied before fc2 (as megatron's ``MLP`` does with ``per_token_scale``), and one
grouped matrix product for fc2. No communication happens here: the dispatcher gathers the tokens
of the expert-tensor-parallel ranks and reduces their partial fc2 outputs.

``grouped_matmul`` uses ``torch._grouped_mm`` (one kernel for all experts) on CUDA for bf16 with
16-byte aligned rows; elsewhere (the CPU, fp32) a loop of one matmul per expert, the exact
reference. megatron-core's ``SequentialMLP`` (one ``MLP`` module per expert) stays available as
``model.moe.grouped_gemm=false`` and is what ``tests/test_moe_experts.py`` compares against.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

__all__ = ["GroupedExperts", "grouped_matmul", "uses_grouped_mm"]


def uses_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`grouped_matmul` runs ``torch._grouped_mm`` for these operands."""
    return (
        x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
        and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    )


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``x`` [T, K] (rows grouped by expert, ``tokens_per_expert[e]`` rows for expert e) times
    ``w`` [E, K, N] -> [T, N]: rows of expert e are multiplied by ``w[e]``."""
    if uses_grouped_mm(x, w):
        offsets = torch.cumsum(tokens_per_expert.to(device=x.device), 0, dtype=torch.int32)
        return torch._grouped_mm(x, w, offs=offsets)
    counts = [int(c) for c in tokens_per_expert.tolist()]
    parts = x[: sum(counts)].split(counts)
    return torch.cat([part @ w[e] for e, part in enumerate(parts)])


def _expert_parallel(config) -> bool:
    """megatron-core's rule for expert weights: reduced over the expert data-parallel group
    (``allreduce=False``) when experts are split over EP ranks or ETP differs from TP."""
    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    return config.expert_model_parallel_size > 1 or etp != config.tensor_model_parallel_size


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer (``MoESubmodules(experts=GroupedExperts)``)."""

    def __init__(self, num_local_experts: int, config, *, pg_collection=None, name: str | None = None, **_):
        super().__init__(config=config)
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("GroupedExperts implements SwiGLU experts (gated_linear_unit with silu)")
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no expert biases (add_bias_linear=False)")
        if config.moe_apply_probs_on_input:
            raise ValueError("GroupedExperts applies the routing probabilities after SwiGLU (moe_apply_probs_on_input=False)")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.ep_group, self.tp_group = pg_collection.ep, pg_collection.expt_tp
        self.dp_group = getattr(pg_collection, "expt_dp", None)
        etp = self.tp_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size {ffn} is not divisible by the expert tensor-parallel size {etp}")
        self.num_local_experts, self.ffn_local = num_local_experts, ffn // etp
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        h = config.hidden_size
        self.fc1_weight = torch.nn.Parameter(torch.empty(num_local_experts, 2 * self.ffn_local, h, device=device,
                                                         dtype=config.params_dtype))
        self.fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, h, self.ffn_local, device=device,
                                                         dtype=config.params_dtype))
        expert_parallel = _expert_parallel(config)
        for p, dim in ((self.fc1_weight, 1), (self.fc2_weight, 2)):
            # split over expert TP like a column- (fc1) or row-parallel (fc2) linear; expert-DP reduced
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = etp > 1, dim, 1
            p.allreduce = not expert_parallel
        if config.perform_initialization:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's weights from megatron's init methods, under the expert-parallel RNG
        (different on every EP/ETP rank, reproducible)."""
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        fork = tracker.fork("expert-parallel-rng") if "expert-parallel-rng" in tracker.get_states() else nullcontext()
        with fork, torch.no_grad():
            for e in range(self.num_local_experts):
                self.config.init_method(self.fc1_weight[e])
                self.config.output_layer_init_method(self.fc2_weight[e])

    def forward(self, permuted_tokens: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor, **_):
        """``permuted_tokens`` [T, H] grouped by local expert, ``tokens_per_expert`` [E_local],
        ``permuted_probs`` [T] -> (output [T, H], None)."""
        h = grouped_matmul(permuted_tokens, self.fc1_weight.transpose(1, 2), tokens_per_expert)
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        act = (act * permuted_probs.unsqueeze(-1)).to(permuted_tokens.dtype)
        return grouped_matmul(act, self.fc2_weight.transpose(1, 2), tokens_per_expert), None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the ordinary backward (no delayed wgrad)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed-checkpoint entries in the global layout ``fc1_weight`` [E, 2I, H] (per
        expert all gate rows, then all up rows: HF's fused ``gate_up_proj``) and ``fc2_weight``
        [E, H, I], with this rank's experts and ETP part at their global offsets, so a checkpoint
        loads under another EP/ETP layout. The data are the parameters themselves (the optimizer
        state maps onto them); fc1's gate and up halves are separate shards under ETP."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        n = len(sharded_offsets)
        expert_axis = (n, self.ep_group.rank(), self.ep_group.size())
        etp_rank, etp = self.tp_group.rank(), self.tp_group.size()
        dp_rank = self.dp_group.rank() if self.dp_group is not None else parallel_state.get_expert_data_parallel_rank()
        replica = (0, 0, dp_rank)
        fc1_key, fc2_key = f"{prefix}fc1_weight", f"{prefix}fc2_weight"
        fc2_offsets = [*sharded_offsets, expert_axis] + ([(n + 2, etp_rank, etp)] if etp > 1 else [])
        out = {fc2_key: ShardedTensor.from_rank_offsets(fc2_key, self.fc2_weight, *fc2_offsets, replica_id=replica)}
        if etp == 1:
            out[fc1_key] = ShardedTensor.from_rank_offsets(fc1_key, self.fc1_weight, *sharded_offsets, expert_axis,
                                                           replica_id=replica)
            return out

        def build(key, t, replica_id, flattened_range):
            gate, up = t.chunk(2, dim=1)
            return [ShardedTensor.from_rank_offsets(key, half, *sharded_offsets, expert_axis,
                                                    (n + 1, which * etp + etp_rank, 2 * etp), replica_id=replica_id)
                    for which, half in enumerate((gate, up))]

        def merge(halves):
            return torch.cat(halves, dim=1)

        out[fc1_key] = ShardedTensorFactory(fc1_key, self.fc1_weight, build, merge, replica)
        return out
