"""torchrun worker: tensor parallelism (tp = world size) vs the full model in each process.

The full model (its own one-rank TP group) is perturbed, its weights are sharded with the weight
mapping into the TP model; loss and gradients (merged over TP ranks) must match. Prints "ok ..."
on rank 0.
"""

import sys

import torch
import torch.distributed as dist
from loongforge.backends.cpu import CpuBackend
from loongforge_diffusion.testing import A14B, rel_err
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT
from loongforge_diffusion.wan.weights import weight_mapping
from megatron.core import parallel_state


def main():
    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    with CpuBackend().activate():
        parallel_state.initialize_model_parallel(tp, 1)
        solo = [dist.new_group([r]) for r in range(tp)][rank]
        wan = WanConfig.from_diffusers(dict(A14B))
        torch.manual_seed(0)
        full = WanDiT(wan, tp_group=solo)
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sharded = WanDiT(wan)
        mapping = weight_mapping(wan)
        state = {n: mapping.shard(n, p.detach(), rank, tp) for n, p in full.named_parameters()}
        sharded.load_state_dict(state, strict=True)
        g = torch.Generator().manual_seed(1)
        x, ctx, t = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([900., 40.])
        target = torch.randn(2, 16, 2, 4, 4, generator=g)
        ref = (full(x, t, ctx) - target).pow(2).mean()
        ref.backward()
        got = (sharded(x, t, ctx) - target).pow(2).mean()
        got.backward()
        errs = [rel_err(got.detach(), ref.detach())]
        params = dict(sharded.named_parameters())
        for n, p in full.named_parameters():
            shards = [torch.empty_like(params[n].grad) for _ in range(tp)]
            dist.all_gather(shards, params[n].grad.contiguous())
            errs.append(rel_err(mapping.merge_tp(n, shards), p.grad))
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if rank == 0:
        print("ok" if max(errs) < 1e-4 else "FAIL", max(errs), errs[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
