"""One MoE training step (forward, backward, AdamW) on one GPU: grouped-GEMM experts vs
megatron-core's SequentialMLP vs HF Transformers.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python bench/moe_step.py                 # Qwen3-30B-A3B layers
    ... python bench/moe_step.py --layers 2 --rows ours,mcore
    ... python bench/moe_step.py --tiny                                                     # CPU smoke run

The model is ``qwen3_moe/qwen3_30b_a3b`` (hidden 2048, 128 experts, top-8, expert FFN 768, 32
heads, 4 KV heads, head_dim 128) with ``--layers`` decoder layers (default 4: with megatron's
fp32 gradient buffer, fp32 master weights and two AdamW states, ~18 bytes per parameter, four
layers plus the 151,936-row embedding and output layer are ~3.1 B parameters, ~56 GiB), sequence
``--seq`` 4096, bf16, micro-batch ``--mbs`` 1.

Rows (``--rows``; ``name:opt`` as in bench/llm_step.py):

- ``ours``: the ``qwen3_moe`` provider's ``GPTModel`` on the CUDA backend's layer spec with
  megatron-core's ``MoELayer`` (``TopKRouter``, all-to-all dispatcher) and our ``GroupedExperts``
  (one ``torch._grouped_mm`` per projection for all experts), megatron-core DDP + optimizer as in
  bench/llm_step.py. Option ``nokernels``: the plain local spec.
- ``mcore``: megatron-core's own local-spec MoE: the same ``MoELayer`` with ``SequentialMLP``
  (one ``MLP`` per expert, a Python loop over experts), the plain local spec.
- ``hf``: ``Qwen3MoeForCausalLM`` (transformers' experts loop), bf16, ``torch.optim.AdamW``.

MFU counts the ACTIVE parameters only (the top-k experts a token uses):
MFU = tokens/s x FLOPs/token / 989e12, FLOPs/token = 6 x N_active + 6 x L x (heads x head_dim) x S,
N_active = matrix-product parameters a token goes through (attention, router, top-k experts of
each layer, output layer; not the input embedding lookup).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_step import PEAK, Clock, megatron_world, model_section, parse_row, time_steps  # noqa: E402


def active_flops_per_token(provider, seq: int) -> tuple[float, int]:
    """(FLOPs per token, N_active) as the module docstring defines them (the provider's own formula)."""
    a = provider.args
    fpt = provider.flops_per_token(seq)
    return fpt, round((fpt - 6 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * seq) / 6)


def row_megatron(section: dict, args, opts: dict, grouped: bool) -> dict:
    from loongforge.model_provider import RunSettings
    from loongforge.modules.layer_spec import local_sdpa_spec
    from loongforge.trainer.optim import use_fused_adam
    from loongforge_cuda.backend import CudaBackend
    from loongforge_cuda.plugin import loongforge_register_kernels
    from loongforge_kernels.plugin import KERNELS
    from loongforge_llm.moe.provider import MoEProvider
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    mbs, seq = int(opts.get("mbs", args.mbs)), args.seq
    backend = CudaBackend()
    plain = not grouped or bool(opts.get("nokernels"))
    if not plain:
        backend.configure_kernels([*KERNELS, *loongforge_register_kernels()], [])
    provider = MoEProvider({**section, "moe": {"grouped_gemm": grouped}})
    run = RunSettings(bf16=True, seq_length=seq)
    cuda = args.device == "cuda"
    with megatron_world(backend, cuda):
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = provider.transformer_config(run)
        if plain:
            backend.layer_spec = lambda config, model_cfg: local_sdpa_spec(config)
        model = provider.build(config, run, backend=backend).to(args.device)
        model = Float16Module(config, model)
        model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
            bf16=True, params_dtype=torch.bfloat16), [model])
        if cuda:
            use_fused_adam(optimizer, adamw_step=None)
        vocab = provider.args.vocab_size

        def step():
            model.zero_grad_buffer()
            optimizer.zero_grad()
            tokens = torch.randint(0, vocab, (mbs, seq + 1), device=args.device)
            loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean()
            loss.backward()  # the routers' aux loss adds its gradient here too
            model.finish_grad_sync()
            mid = clock.mark()
            ok, _, _ = optimizer.step()
            assert ok, "optimizer step skipped"
            return loss.detach(), mid

        clock = Clock(cuda)
        result = time_steps(step, clock, args.warmup, args.steps, profile=args.profile)
    fpt, n_active = active_flops_per_token(provider, seq)
    result.update(tokens=mbs * seq, flops_token=fpt, n_active=n_active, mbs=mbs,
                  n_total=provider.num_parameters())
    return result


def row_hf(section: dict, args, opts: dict) -> dict:
    """bench/llm_step.py's HF row (options fused, gas=N, ckpt) with MFU on active parameters."""
    import llm_step
    from loongforge_llm.moe.provider import MoEProvider

    result = llm_step.row_hf(section, args, opts)
    provider = MoEProvider(section)
    fpt, n_active = active_flops_per_token(provider, args.seq)
    result.update(flops_token=fpt, n_active=n_active, n_total=provider.num_parameters())
    return result


ROWS = {"ours": lambda s, a, o: row_megatron(s, a, o, grouped=True),
        "mcore": lambda s, a, o: row_megatron(s, a, o, grouped=False),
        "hf": row_hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_moe/qwen3_30b_a3b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (fit one GPU with full AdamW)")
    parser.add_argument("--rows", default="ours,mcore,hf")
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown (bench/llm_step.py's)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: qwen3_moe_tiny, seq 32, 1+2 steps (no meaningful speed)")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.device, args.seq, args.warmup, args.steps = "qwen3_moe/qwen3_moe_tiny", "cpu", 32, 1, 2
        args.layers = min(args.layers, 2)
    section = {**model_section(args.model), "num_hidden_layers": args.layers}
    results = []
    for spec in args.rows.split(","):
        kind, opts = parse_row(spec)
        t0 = time.time()
        try:
            r = ROWS[kind](section, args, opts)
            r.update(row=spec, wall_s=time.time() - t0)
            r["tok_s"] = r["tokens"] / (r["ms"] / 1e3)
            r["mfu"] = r["tok_s"] * r["flops_token"] / PEAK
            print(f"[{spec}] {json.dumps({k: v for k, v in r.items() if k != 'kernels'}, default=str)}", flush=True)
        except Exception as exc:  # a failing row (OOM...) must not hide the others
            traceback.print_exc()
            r = {"row": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        results.append(r)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in results if "error" not in r]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run, no meaningful speed)"
    if ok:
        r0 = ok[0]
        print(f"\n{args.model} with {args.layers} layers ({r0['n_total'] / 1e9:.2f} B parameters, "
              f"{r0['n_active'] / 1e9:.3f} B active in matrix products), seq {args.seq}, bf16, {device}")
        print(f"MFU = tokens/s x {r0['flops_token'] / 1e9:.3f} GFLOP/token / 989 TFLOP/s; FLOPs/token = "
              f"6 x N_active + 6 x L x heads x head_dim x S; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'row':16} {'mbs':>3} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}  loss")
    for r in results:
        if "error" in r:
            print(f"{r['row']:16} FAILED: {r['error']}")
            continue
        if not all(math.isfinite(x) for x in r["loss"]):
            print(f"{r['row']:16} INVALID: non-finite loss {r['loss']}")
            continue
        print(f"{r['row']:16} {r['mbs']:>3} {r['ms']:>9.1f} {r['tok_s']:>10,.0f} {100 * r['mfu']:>5.1f}% "
              f"{r['peak_gib']:>9.1f}  {r['loss'][0]:.3f}->{r['loss'][1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
