"""Causal attention kernels side by side on one GPU: torch SDPA (cuDNN, flash, memory-efficient),
our Triton flash attention and each installed Dao-AILab flash-attention, forward and
forward+backward, on megatron's [S, B, H, D] layout.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python bench/attention.py

TFLOP/s counts causal work only: forward 2 B H S^2 D (two matmuls over half the score matrix),
backward 2.5 x forward (five matmuls, one of them recomputing the scores).
"""

from __future__ import annotations

import argparse
import functools

import torch
from loongforge_cuda import flash_attn
from loongforge_cuda.attention import CANDIDATES, sdpa
from loongforge_kernels.flash_attention import flash_attention_triton

SHAPES = ((2, 32, 8, 4096, 64), (8, 32, 8, 4096, 64), (1, 32, 8, 4096, 128))


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    kernels = {"triton": flash_attention_triton} | {
        name: functools.partial(flash_attn.flash_attn_attention, name) for name in flash_attn.installed()}
    print(f"{'B,H,Hkv,S,D':22} {'kernel':18} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
    for b, h, h_kv, s, d in SHAPES:
        flops = 2 * b * h * s * s * d
        q, k, v = (torch.randn(s, b, n, d, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_()
                   for n in (h, h_kv, h_kv))
        grad = torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3)
        for backend, repeat in [*CANDIDATES, *((name, False) for name in kernels)]:
            name = backend + (" (repeat kv)" if repeat else "")
            run = functools.partial(sdpa, q, k, v, None, True, d**-0.5, 0.0, backend, repeat, kernels)
            try:
                fwd = timed(run, args.reps)
                both = timed(lambda run=run, grad=grad: run().backward(grad), args.reps)
            except RuntimeError as exc:
                print(f"{str((b, h, h_kv, s, d)):22} {name:18} unsupported: {str(exc).splitlines()[0][:60]}")
                continue
            print(f"{str((b, h, h_kv, s, d)):22} {name:18} {fwd:8.3f} {flops / fwd / 1e9:8.1f} {both:11.3f} "
                  f"{3.5 * flops / both / 1e9:8.1f}")
        del q, k, v, grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
