"""torchrun worker: CP (cp = world size; Ulysses and all-gather) vs the same model in one process, plain and packed.

Each rank builds identical weights, computes the full-sequence reference locally, then its CP
part; the CP loss sums and parameter gradients (all-reduced over CP, as megatron's DDP does over
the dp x cp group) must equal the reference. Prints one line "ok <rel errs>" on rank 0.
"""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from loongforge.backends.cpu import CpuBackend
from loongforge_diffusion.batching import assemble, sample_tokens, split_for_cp, token_loss_sum
from loongforge_diffusion.flow import FlowMatching
from loongforge_diffusion.testing import TI2V, rel_err
from loongforge_diffusion.wan import context_parallel
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT
from megatron.core import parallel_state

FLOW = SimpleNamespace(shift=3.0, timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, loss_weighting="none",
                       cfg_dropout=0.3, first_frame_prob=0.5, expert="both")


def loss_of(model, b):
    out = model(b["tokens"], b["timestep"].double(), b["context"], positions=b["positions"],
                self_mask=b["self_mask"], cross_mask=b["cross_mask"])
    return token_loss_sum(out, b["target"], b["coef"])


def main():
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    with CpuBackend().activate():
        parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
        group = parallel_state.get_context_parallel_group()
        wan = WanConfig.from_diffusers(dict(TI2V), expand_timesteps=True)
        torch.manual_seed(0)
        model = WanDiT(wan)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        flow = FlowMatching.from_config(FLOW)
        errs = []
        cases = [(False, [(48, 3, 4, 4)] * 2), (True, [(48, 3, 4, 4), (48, 2, 4, 6), (48, 1, 4, 4)])]
        for mode, (pack, shapes) in [(m, c) for m in context_parallel.MODES for c in cases]:
            items = [sample_tokens(model, flow, torch.randn(s, generator=torch.Generator().manual_seed(i)),
                                   torch.randn(5, 32, generator=torch.Generator().manual_seed(10 + i)),
                                   torch.zeros(5, 32), seed=i) for i, s in enumerate(shapes)]
            full = assemble(items, pack, True)
            context_parallel.enable(model, None)
            model.zero_grad()
            ref = loss_of(model, full)
            ref.backward()
            want = {n: p.grad.clone() for n, p in model.named_parameters()}
            context_parallel.enable(model, group, mode)
            model.zero_grad()
            local = loss_of(model, split_for_cp(full, rank, cp))
            local.backward()
            total = local.detach().clone()
            dist.all_reduce(total, group=group)
            errs.append(rel_err(total, ref.detach()))
            for n, p in model.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g, group=group)
                errs.append(rel_err(g, want[n]))
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if rank == 0:
        print("ok" if max(errs) < 1e-4 else "FAIL", max(errs), errs[0], errs[len(errs) // 2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
