"""One Wan2.2 TI2V-5B training step (forward, backward, AdamW) on one GPU: ours vs diffusers vs DiffSynth-Studio.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python bench/wan_step.py                 # 480x832, 49 frames
    ... python bench/wan_step.py --layers 12 --rows ours,diffusers,diffsynth --steps 10
    ... python bench/wan_step.py --tiny                                                  # CPU smoke run

Shape: Wan2.2 TI2V-5B (hidden 3072, 24 heads x 128, FFN 14336, 48 latent channels, per-token
timesteps) with ``--layers`` of its 30 blocks, so the full AdamW state fits one H100 in every row.
A 49-frame 480x832 clip is a 13 x 30 x 52 latent after the Wan2.2 VAE (4 x 16 x 16 compression:
1 + 48/4 frames, 480/16, 832/16), i.e. 13 x 15 x 26 = 5070 tokens with the (1, 2, 2) patch; the
text context is 512 umT5 tokens of 4096. The first latent frame is the clean image condition
(timestep 0 on its tokens), as TI2V trains.

Rows (``--rows``):

- ``ours``: ``loongforge_diffusion``'s WanDiT (megatron-core TP linears, torch SDPA), bf16 in
  megatron's Float16Module, megatron DDP (fp32 gradient buffer) and megatron's optimizer (fp32
  master weights, fused AdamW) -- what ``loongforge run`` trains with.
- ``diffusers``: ``diffusers.WanTransformer3DModel`` from the same config, bf16 parameters,
  ``torch.optim.AdamW`` (fused; bf16 states), its default attention (SDPA).
- ``diffsynth``: DiffSynth-Studio's ``WanModel`` with its TI2V-5B kwargs
  (``diffsynth.configs.model_configs``), driven by its ``model_fn_wan_video`` as its trainer does
  (batch 1; bf16 parameters, ``torch.optim.AdamW``; its attention is FA3 / FA2 / SageAttention when
  installed, else SDPA). Only when ``diffsynth`` imports: diffsynth 2.1.12 needs torchvision,
  einops, modelscope, ftfy, imageio, pandas, accelerate and peft besides torch/transformers
  (carry them as wheels; this row never ran here: torchvision is not installed on the CPU machine).

Each row: ``--warmup`` steps, then the median of ``--steps`` timed steps. samples/s = mbs / step
time. MFU = samples/s x FLOPs/sample / 989e12 (H100 bf16 dense), FLOPs/sample from
``loongforge_diffusion.task.wan_flops_per_sample`` (printed with the table; matmuls only,
forward + backward = 3 x forward).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time
import traceback
from pathlib import Path

import torch
import yaml

PEAK = 989e12
ROOT = Path(__file__).resolve().parents[1]
SIZES = ROOT / "packages/loongforge-diffusion/src/loongforge_diffusion/configs/models/wan"


def wan_config(args):
    from loongforge_diffusion.wan.config import WanConfig

    section = yaml.safe_load((SIZES / ("wan_tiny.yaml" if args.tiny else "wan2.2_ti2v_5b.yaml")).read_text())
    section["num_layers"] = args.layers
    return WanConfig.from_section(section)


def inputs(wan, grid, mbs, text_len, device, seed):
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    x = torch.randn(mbs, wan.in_channels, f, h, w, generator=g)
    target = torch.randn(mbs, wan.out_channels, f, h, w, generator=g)
    ctx = torch.randn(mbs, text_len, wan.text_dim, generator=g)
    t = torch.rand(mbs, generator=g) * 1000
    tokens_per_frame = (h // wan.patch_size[1]) * (w // wan.patch_size[2])
    per_token = t[:, None].repeat(1, (f // wan.patch_size[0]) * tokens_per_frame)
    per_token[:, :tokens_per_frame] = 0.0  # the clean first frame (image condition)
    return [v.to(device) for v in (x, target, ctx, t, per_token)]


def time_steps(step, device, warmup, steps) -> dict:
    cuda = device == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "loss": (losses[0], losses[-1])}


@contextlib.contextmanager
def megatron_world(device):
    """One-rank megatron-core with our backend active: CUDA (NCCL) or, for smoke runs, the CPU (gloo)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if device != "cuda":
        from loongforge.testing import single_process_megatron

        with single_process_megatron():
            yield
        return
    from loongforge_cuda.backend import CudaBackend

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    with CudaBackend().activate(0):
        yield


def row_ours(wan, grid, args):
    from loongforge.trainer.optim import use_fused_adam
    from loongforge_diffusion.wan.model import WanDiT
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    with megatron_world(args.device):
        torch.manual_seed(0)
        config = wan.transformer_config(bf16=True)
        model = Float16Module(config, WanDiT(wan, config).to(args.device))
        model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        backend = None
        if args.device == "cuda":  # what the trainer does on the CUDA backend: weight gradients straight
            from loongforge_cuda.backend import CudaBackend  # into the fp32 buffer, one-pass AdamW kernel
            from loongforge_cuda.plugin import loongforge_register_kernels
            from loongforge_kernels.plugin import KERNELS

            backend = CudaBackend()
            backend.configure_kernels([*KERNELS, *loongforge_register_kernels()], [])
            backend.after_data_parallel([model])
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, weight_decay=0.01, clip_grad=1.0,
                                                     bf16=True, params_dtype=torch.bfloat16), [model])
        use_fused_adam(opt, adamw_step=backend.kernel("adamw_step") if backend else None)
        x, target, ctx, _, t = inputs(wan, grid, args.mbs, args.text_len, args.device, 0)

        def step():
            model.zero_grad_buffer()
            opt.zero_grad()
            loss = (model(x, t.double(), ctx).float() - target).pow(2).mean()
            loss.backward()
            model.finish_grad_sync()
            ok, _, _ = opt.step()
            assert ok
            return loss.detach()

        return time_steps(step, args.device, args.warmup, args.steps)


def row_diffusers(wan, grid, args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = {k: v for k, v in wan.to_diffusers().items() if not k.startswith("_")}
    model = WanTransformer3DModel(**cfg).to(args.device, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=args.device == "cuda")
    x, target, ctx, _, t = inputs(wan, grid, args.mbs, args.text_len, args.device, 0)
    x, ctx = x.bfloat16(), ctx.bfloat16()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (model(x, t, ctx, return_dict=False)[0].float() - target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return time_steps(step, args.device, args.warmup, args.steps)


def row_diffsynth(wan, grid, args):
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    if args.mbs != 1:
        raise ValueError("DiffSynth's per-token timestep path (seperated_timestep) takes batch 1")
    torch.manual_seed(0)
    model = WanModel(dim=wan.hidden_size, in_dim=wan.in_channels, ffn_dim=wan.ffn_dim, out_dim=wan.out_channels,
                     text_dim=wan.text_dim, freq_dim=wan.freq_dim, eps=wan.eps, patch_size=list(wan.patch_size),
                     num_heads=wan.num_attention_heads, num_layers=wan.num_layers, has_image_input=False,
                     seperated_timestep=True, require_clip_embedding=False, require_vae_embedding=False,
                     fuse_vae_embedding_in_latents=True).to(args.device, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=args.device == "cuda")
    x, target, ctx, t, _ = inputs(wan, grid, 1, args.text_len, args.device, 0)
    x, ctx, t = x.bfloat16(), ctx.bfloat16(), t.bfloat16()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model_fn_wan_video(dit=model, latents=x, timestep=t, context=ctx, fuse_vae_embedding_in_latents=True)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return time_steps(step, args.device, args.warmup, args.steps)


ROWS = {"ours": row_ours, "diffusers": row_diffusers, "diffsynth": row_diffsynth}


def main() -> None:
    from loongforge_diffusion.wan.flops import latent_grid, wan_flops_per_sample

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="ours,diffusers,diffsynth")
    p.add_argument("--layers", type=int, default=None, help="blocks of the 30 (default 12; --tiny: 2)")
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the wan_tiny size, 9 frames of 64x64")
    args = p.parse_args()
    if args.tiny:
        args.frames, args.height, args.width, args.text_len = 9, 64, 64, 16
        args.warmup, args.steps = 1, 2
    args.layers = args.layers or (2 if args.tiny else 12)
    wan = wan_config(args)
    grid = latent_grid(wan, args.frames, args.height, args.width)
    pt, ph, pw = wan.patch_size
    tokens = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
    flops = wan_flops_per_sample(wan, tokens, args.text_len)
    print(f"Wan2.2 TI2V-5B shape, {wan.num_layers} of 30 blocks ({'tiny' if args.tiny else 'hidden 3072'}), "
          f"{args.frames} frames {args.height}x{args.width} -> latent {grid[0]}x{grid[1]}x{grid[2]} "
          f"(VAE {wan.vae_scale_factor_temporal}x{wan.vae_scale_factor_spatial}x{wan.vae_scale_factor_spatial}) -> "
          f"{tokens} tokens (patch {wan.patch_size}), text {args.text_len}, mbs {args.mbs}, {args.device}")
    print(f"FLOPs/sample = 3 x [N (8Sd^2 + 4S^2d + 4Sd^2 + 4Ld^2 + 4SLd + 4Sdf) + embeddings] = {flops:.4e} "
          f"(S={tokens}, L={args.text_len}, d={wan.hidden_size}, f={wan.ffn_dim}, N={wan.num_layers})")
    print("MFU = samples/s x FLOPs/sample / 989e12 (H100 bf16 dense)\n")
    results = {}
    for name in [r for r in args.rows.split(",") if r]:
        try:
            results[name] = ROWS[name](wan, grid, args)
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
        except Exception:  # one failing row must not hide the others
            print(f"{name}: FAILED\n{traceback.format_exc()}")
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("| row | ms/step | samples/s | MFU | peak GiB | loss first -> last |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = results.get("diffsynth") or results.get("diffusers")
    for name, r in results.items():
        sps = args.mbs / r["s"]
        mfu = f"{100 * sps * flops / PEAK:.1f}%" if args.device == "cuda" else "n/a (cpu)"
        print(f"| {name} | {1000 * r['s']:.1f} | {sps:.3f} | {mfu} | {r['peak_gib']:.1f} | "
              f"{r['loss'][0]:.4f} -> {r['loss'][1]:.4f} |")
    if base and "ours" in results:
        ref = "diffsynth" if "diffsynth" in results else "diffusers"
        print(f"\nours vs {ref}: {results[ref]['s'] / results['ours']['s']:.2f}x samples/s")


if __name__ == "__main__":
    main()
