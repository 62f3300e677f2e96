"""Multi-process checks run under torch's elastic launcher by ``test_collectives.py``.

    python -m torch.distributed.run --nproc-per-node N dist_worker.py CHECK [CHECK ...]

Each CHECK is a function below; every rank runs it on the CPU backend with gloo and compares with
what the maths says the result must be (computed locally from the same seeded tensors). A failed
check raises, so the launcher exits non-zero; rank 0 prints one ``CHECK ok <details>`` line each.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> float:
    rel = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    if not rel <= tol:
        raise AssertionError(f"rank {dist.get_rank()}: {name}: relative error {rel:.3e} > {tol:g}")
    return rel


def collectives() -> str:
    """The collectives megatron-core's sequence parallelism, distributed optimizer and our context
    parallelism call, as they behave on gloo (fp32 and bf16, sync and coalesced async)."""
    from torch.distributed.distributed_c10d import _coalescing_manager

    rank, world = dist.get_rank(), dist.get_world_size()
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [torch.arange(world * 3, dtype=torch.float32).mul(r + 1).to(dtype) for r in range(world)]
        total = torch.stack([x.float() for x in inputs]).sum(0)
        out = torch.empty(3, dtype=dtype)
        dist.reduce_scatter_tensor(out, inputs[rank])
        _close(f"reduce_scatter_tensor {dtype}", out.float(), total[rank * 3:(rank + 1) * 3], 0)
        gathered = torch.empty(world * 3, dtype=dtype)
        dist.all_gather_into_tensor(gathered, inputs[rank][:3].contiguous())
        _close(f"all_gather_into_tensor {dtype}", gathered.float(),
               torch.cat([x[:3].float() for x in inputs]), 0)
        # the distributed optimizer's bucketed path: async ops inside a coalescing manager
        outs = [torch.empty(3, dtype=dtype), torch.empty(3, dtype=dtype)]
        with _coalescing_manager(async_ops=True) as cm:
            for o in outs:
                dist.reduce_scatter_tensor(o, inputs[rank], async_op=True)
        cm.wait()
        for o in outs:
            _close(f"coalesced reduce_scatter_tensor {dtype}", o.float(), total[rank * 3:(rank + 1) * 3], 0)
        outs = [torch.empty(world * 3, dtype=dtype) for _ in range(2)]
        with _coalescing_manager(async_ops=True) as cm:
            for o in outs:
                dist.all_gather_into_tensor(o, inputs[rank][:3].contiguous(), async_op=True)
        cm.wait()
        for o in outs:
            _close(f"coalesced all_gather_into_tensor {dtype}", o.float(),
                   torch.cat([x[:3].float() for x in inputs]), 0)
    # megatron-core's sequence-parallel mappings (forward and backward) through the CPU backend
    from loongforge.backends.cpu import CpuBackend

    with CpuBackend().activate():
        from megatron.core.tensor_parallel import mappings

        x = torch.randn(world * 4, 2, 5, generator=torch.Generator().manual_seed(7))
        local = x[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        full = mappings.gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True,
                                                               group=dist.group.WORLD)
        _close("gather_from_sequence_parallel_region", full.detach(), x, 0)
        full.backward(torch.full_like(full, float(rank + 1)))
        # every rank's upstream gradient flows back to the owner's slice: sum of (r + 1) over ranks
        _close("gather backward (reduce-scatter)", local.grad, torch.full_like(local, world * (world + 1) / 2), 0)
        part = mappings.reduce_scatter_to_sequence_parallel_region(x * (rank + 1), group=dist.group.WORLD)
        _close("reduce_scatter_to_sequence_parallel_region", part,
               x[rank * 4:(rank + 1) * 4] * (world * (world + 1) / 2), 1e-6)
    return f"world={world}"


def supplied_collectives() -> str:
    """The CPU backend's own list ``reduce_scatter`` and ``all_reduce(AVG)`` on gloo: installed only
    inside ``activate()``, equal to the maths (fp32 and bf16, sync and async, non-contiguous
    inputs), and what megatron-core's multimodal context-parallel scatter runs on."""
    from loongforge.backends import cpu
    from megatron.core import parallel_state
    from megatron.core.models.multimodal import context_parallel as mm_cp

    rank, world = dist.get_rank(), dist.get_world_size()
    native = (dist.reduce_scatter, dist.all_reduce, dist.all_to_all_single)
    calls = []
    with cpu.CpuBackend().activate():
        if (dist.reduce_scatter, dist.all_reduce) != (cpu.gloo_reduce_scatter, cpu.gloo_all_reduce):
            raise AssertionError("activate() did not install the supplied gloo collectives")
        for dtype in (torch.float32, torch.bfloat16):
            tol = 0 if dtype == torch.float32 else 1e-2
            full = [torch.randn(4, 3 * world, generator=torch.Generator().manual_seed(r)).to(dtype).float()
                    for r in range(world)]
            want = torch.stack(full).sum(0)
            mine = full[rank].to(dtype)
            # rank r's input to the scatter are columns 3r..3r+2: slices, not contiguous, as
            # megatron-core passes them
            pieces = [mine[:, 3 * r:3 * (r + 1)] for r in range(world)]
            for async_op in (False, True):
                out = torch.empty(4, 3, dtype=dtype)
                work = dist.reduce_scatter(out, pieces, async_op=async_op)
                if async_op:
                    work.wait()
                _close(f"reduce_scatter {dtype} async={async_op}", out.float(), want[:, 3 * rank:3 * (rank + 1)], tol)
                avg = mine.clone()
                work = dist.all_reduce(avg, op=dist.ReduceOp.AVG, async_op=async_op)
                if async_op:
                    work.wait()
                _close(f"all_reduce AVG {dtype} async={async_op}", avg.float(), want / world, tol)
            out = torch.empty(4, 3, dtype=dtype)
            dist.reduce_scatter(out, pieces, op=dist.ReduceOp.AVG)
            _close(f"reduce_scatter AVG {dtype}", out.float(), want[:, 3 * rank:3 * (rank + 1)] / world, tol)
            dist.reduce_scatter(out, pieces, op=dist.ReduceOp.MAX)
            _close(f"reduce_scatter MAX {dtype}", out.float(),
                   torch.stack(full).max(0).values[:, 3 * rank:3 * (rank + 1)], 0)
        # all_to_all_single with its split sizes as tensors, as megatron-core's MoE all-to-all
        # dispatcher passes them on the CPU (rank s sends s + d + 1 rows to rank d)
        from megatron.core.tensor_parallel import mappings

        if dist.all_to_all_single is not cpu.cpu_all_to_all_single:
            raise AssertionError("activate() did not install the supplied all_to_all_single")
        sent = [torch.arange(sum(src + d + 1 for d in range(world)), dtype=torch.float32)[:, None] + 100 * src
                for src in range(world)]
        splits_in = torch.tensor([rank + d + 1 for d in range(world)])
        splits_out = torch.tensor([src + rank + 1 for src in range(world)])
        got = mappings.all_to_all(dist.group.WORLD, sent[rank], splits_out, splits_in)
        want = torch.cat([sent[src][sum(src + d + 1 for d in range(rank)):][:src + rank + 1] for src in range(world)])
        _close("all_to_all_single with tensor splits", got, want, 0)
        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            wrapped = cpu.gloo_reduce_scatter

            def counting(*args, **kwargs):
                calls.append(1)
                return wrapped(*args, **kwargs)

            dist.reduce_scatter = counting
            x = torch.randn(3, world * 2, 4, generator=torch.Generator().manual_seed(rank))
            mine = mm_cp._reduce_scatter_along_second_dim(x)
            xs = [torch.randn(3, world * 2, 4, generator=torch.Generator().manual_seed(r)) for r in range(world)]
            _close("megatron multimodal CP reduce-scatter", mine, torch.stack(xs).sum(0)[:, 2 * rank:2 * (rank + 1)], 1e-6)
        finally:
            dist.reduce_scatter = cpu.gloo_reduce_scatter
            parallel_state.destroy_model_parallel()
    if (dist.reduce_scatter, dist.all_reduce, dist.all_to_all_single) != native:
        raise AssertionError("the supplied collectives outlived activate()")
    if not calls:
        raise AssertionError("megatron-core's multimodal CP scatter did not go through the supplied reduce_scatter")
    return f"world={world}"


def cp_attention() -> str:
    """SDPAttention under context parallelism vs plain SDPA on the whole sequence, forward and
    backward, causal and with a packed-document mask, GQA, in megatron's CP layout."""
    from loongforge.backends.cpu import CpuBackend
    from loongforge.modules.attention import SDPAttention, zigzag_positions
    from loongforge.trainer.batches import document_attention_mask, model_inputs, split_for_context_parallel
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    world = dist.get_world_size()
    details = []
    with CpuBackend().activate():
        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            cp_group = parallel_state.get_context_parallel_group()
            rank = cp_group.rank()
            s, b, hq, hk, d = 12 * world, 2, 4, 2, 8
            cfg = TransformerConfig(num_layers=1, hidden_size=hq * d, num_attention_heads=hq,
                                    num_query_groups=hk, kv_channels=d, context_parallel_size=world,
                                    attention_dropout=0.0)
            attn = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)
            gen = torch.Generator().manual_seed(3)
            q, k, v = (torch.randn(s, b, h, d, generator=gen) for h in (hq, hk, hk))
            upstream = torch.randn(s, b, hq * d, generator=gen)
            # sample 0: three documents; sample 1: one document (rows are independent)
            segments = torch.tensor([[0] * (s // 3) + [1] * (s // 2) + [2] * (s - s // 3 - s // 2), [0] * s])
            keep = zigzag_positions(rank, world, s)
            for name, full_mask in (("causal", None), ("documents", document_attention_mask(segments))):
                ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
                qq, kk, vv = (t.permute(1, 2, 0, 3) for t in ref_in)
                allowed = None if full_mask is None else ~full_mask
                ref = torch.nn.functional.scaled_dot_product_attention(
                    qq, kk, vv, attn_mask=allowed, is_causal=full_mask is None, enable_gqa=True)
                ref = ref.permute(2, 0, 1, 3).reshape(s, b, -1)
                ref.backward(upstream)
                local_in = [t[keep].clone().requires_grad_() for t in (q, k, v)]
                mask = None
                if full_mask is not None:
                    batch = {"tokens": torch.zeros(b, s, dtype=torch.long), "labels": torch.zeros(b, s, dtype=torch.long),
                             "position_ids": torch.arange(s).expand(b, s), "loss_mask": torch.ones(b, s),
                             "segment_ids": segments}
                    mask = model_inputs(split_for_context_parallel(batch), "cpu", True)["attention_mask"]
                    _close("local document mask", mask.float(), full_mask[:, :, keep].float(), 0)
                out = attn(*local_in, attention_mask=mask)
                out.backward(upstream[keep])
                errs = [_close(f"{name} output", out.detach(), ref.detach()[keep])]
                # a rank's K/V gradient is the sum over all ranks' queries: compare it after the
                # reduce-scatter inside the CP all-gather's backward, on this rank's positions
                for label, got, want in zip("qkv", local_in, ref_in, strict=True):
                    errs.append(_close(f"{name} d{label}", got.grad, want.grad[keep]))
                details.append(f"{name} max rel {max(errs):.1e}")
        finally:
            parallel_state.destroy_model_parallel()
    return f"cp={world}: " + ", ".join(details)


def cp_rope_follows_ids() -> str:
    """Under CP, the LLM model's rotary angles are those of the rank's position ids even when the
    ids read 0..s_local-1 (megatron-core's own angles would be the rank's zigzag positions)."""
    from pathlib import Path

    import loongforge_llm
    from loongforge.backends.cpu import CpuBackend
    from loongforge.model_provider import RunSettings
    from loongforge_llm.provider import LLMProvider
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    world = dist.get_world_size()
    section = OmegaConf.load(Path(loongforge_llm.__file__).parent / "configs/models/qwen3/qwen3_tiny.yaml")
    with CpuBackend().activate() as backend:
        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            backend.manual_seed(0)
            provider = LLMProvider(section)
            run = RunSettings(cp=world, seq_length=8 * world)
            model = provider.build(provider.transformer_config(run), run, backend=backend)
            inv_freq = model.rotary_pos_emb.inv_freq
            for name, ids in (("0..s-1", torch.arange(8)), ("restarting", torch.tensor([3, 4, 5, 0, 1, 2, 3, 4]))):
                emb = model._preprocess(torch.zeros(1, 8, dtype=torch.long), ids[None])[1]
                freqs = ids.float()[:, None] * inv_freq
                _close(f"RoPE angles for ids {name}", emb[:, 0, 0], torch.cat((freqs, freqs), -1), 0)
        finally:
            parallel_state.destroy_model_parallel()
    return f"cp={world}"


def cp_batch_layout() -> str:
    """split_for_context_parallel gives each rank exactly what megatron-core's
    get_batch_on_this_cp_rank gives it, and megatron's RoPE slicing picks the same positions."""
    from loongforge.backends.cpu import CpuBackend
    from loongforge.trainer.batches import SEQUENCE_KEYS, split_for_context_parallel
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
    from megatron.core.utils import get_batch_on_this_cp_rank

    world = dist.get_world_size()
    with CpuBackend().activate():
        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            s = 8 * world
            batch = {key: torch.arange(2 * s).view(2, s) * (i + 1) for i, key in enumerate(SEQUENCE_KEYS)}
            ours = split_for_context_parallel(batch)
            theirs = get_batch_on_this_cp_rank({**{k: v.clone() for k, v in batch.items()}, "cu_seqlens": None},
                                               is_hybrid_cp=False,
                                               cp_group=parallel_state.get_context_parallel_group())
            for key in SEQUENCE_KEYS:
                if not torch.equal(ours[key], theirs[key]):
                    raise AssertionError(f"{key}: ours {ours[key].tolist()} != megatron's {theirs[key].tolist()}")
            rope = get_pos_emb_on_this_cp_rank(torch.arange(s).float()[:, None], 0,
                                               parallel_state.get_context_parallel_group())
            if not torch.equal(rope[:, 0].long(), ours["cp_positions"]):
                raise AssertionError(f"RoPE positions {rope[:, 0].tolist()} != {ours['cp_positions'].tolist()}")
            # a task whose forward step forgets the cut is refused instead of attending wrongly
            from loongforge.config import ConfigError
            from loongforge.trainer.batches import model_inputs

            try:
                model_inputs(batch, "cpu", True)
            except ConfigError as exc:
                if "parallel.cp" not in str(exc):
                    raise
            else:
                raise AssertionError("model_inputs took a batch not cut for context parallelism")
        finally:
            parallel_state.destroy_model_parallel()
    return f"cp={world}"


def main() -> None:
    dist.init_process_group("gloo")
    try:
        for name in sys.argv[1:]:
            detail = globals()[name]()
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"{name} ok {detail}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
