"""FP8 linear-layer GEMMs vs bf16 per shape on one GPU: forward + data and weight gradients,
quantisation included (``loongforge_cuda.fp8.measure_candidate``, what ``precision.fp8.recipe=adaptive``
times), with each recipe's relative error vs fp32 and the adaptive choice.

    python bench/fp8_gemm.py                          # the linear layers of Llama-3.2-1B and Qwen3-4B, 8192 tokens
    python bench/fp8_gemm.py --tokens 4096 --budget 0.05

TFLOP/s = 3 x 2 M N K / time (three GEMMs); the FP8 dense peak of an H100/H200 is 1979, bf16's 989.
"""

from __future__ import annotations

import argparse

#: (name, N, K) of y[M, N] = x[M, K] W[N, K]^T
SHAPES = {
    "llama3.2-1b": [("qkv", 3072, 2048), ("proj", 2048, 2048), ("fc1", 16384, 2048), ("fc2", 2048, 8192)],
    "qwen3-4b": [("qkv", 6144, 2560), ("proj", 2560, 4096), ("fc1", 19456, 2560), ("fc2", 2560, 9728)],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budget", type=float, default=0.08)
    p.add_argument("--models", default=",".join(SHAPES))
    args = p.parse_args()
    import torch
    from loongforge_cuda.fp8 import RECIPES, measure_candidate
    from loongforge_kernels.fp8_linear import supports

    print(f"{torch.cuda.get_device_name()}, M = {args.tokens} tokens; time = fwd + dgrad + wgrad (ms), "
          f"TFLOP/s = 6 M N K / time, err = rel. error vs fp32 (max of y, dx)")
    print(f"{'model':12} {'gemm':5} {'N x K':>12} " + " ".join(f"{c:>22}" for c in ("bf16", *RECIPES)) + "  choice")
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            m = args.tokens
            flops = 6 * m * n * k
            cells, best, best_ms = [], "bf16", None
            for c in ("bf16", *RECIPES):
                if c != "bf16" and not supports(c, m, n, k):
                    cells.append(f"{'-':>22}")
                    continue
                ms, err = measure_candidate(c, m, n, k, reps=10)
                cells.append(f"{ms:7.3f} {flops / ms / 1e9:6.0f}TF e{err:.3f}")
                if (c == "bf16" or err <= args.budget) and (best_ms is None or ms < best_ms):
                    best, best_ms = c, ms
            print(f"{model:12} {name:5} {f'{n}x{k}':>12} " + " ".join(cells) + f"  {best}", flush=True)


if __name__ == "__main__":
    main()
