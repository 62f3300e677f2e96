"""One training step (forward, backward, AdamW) on one GPU: LoongForge vs HF Transformers, side by side.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python bench/llm_step.py                # Llama-3.2-1B, seq 4096
    ... python bench/llm_step.py --model qwen3/qwen3_4b --rows ours,hf --mbs 1
    ... python bench/llm_step.py --rows ours,ours:nokernels,ours:mbs=4,hf
    ... python bench/llm_step.py --device cpu --model llama3/llama3_tiny --seq 32 --steps 2   # smoke

Rows (``--rows``, comma-separated; ``name:opt:opt=value`` modifies a row):

- ``ours``: the LLM provider's megatron-core ``GPTModel`` with the CUDA backend's layer spec (SDPA
  kernel measured per shape, Triton RMSNorm/SwiGLU/RoPE) and the chunked LM-head cross-entropy,
  megatron-core DDP (fp32 gradient buffer, as the trainer) and optimizer (fp32 master weights,
  torch's fused AdamW, torch foreach ops for its multi-tensor fallbacks). Options:
  ``nokernels`` (no fused kernels: the plain local spec with torch's SDPA choice),
  ``disable=a+b`` (``kernels.disable``), ``mbs=N``, ``gas=N`` (N micro-batches per optimizer step,
  gradients accumulated in the fp32 buffer: tokens per step = N x mbs x seq), ``gradbf16`` (bf16 gradient buffer instead of
  the trainer's fp32 one),
  ``nowgradfusion`` (weight gradients added to the fp32 buffer by DDP's hook instead of by the GEMM),
  ``distopt`` (megatron's distributed optimizer on one rank), ``torchadam`` (torch's fused AdamW and
  megatron's master -> bf16 copies instead of the multi-tensor ``adamw_step`` kernel), ``foreach``
  (torch's foreach AdamW instead of a fused one), ``mcore_ops`` (megatron-core's per-tensor fallbacks for the grad norm,
  clipping and master -> parameter copy instead of torch's foreach ops),
  ``sdpa=cudnn|flash|efficient|triton|flash_attn4|...`` (force one attention kernel), ``compile``
  (``torch.compile`` each transformer layer). Memory levers and FP8 (config section ``precision``):
  ``bf16moments`` (AdamW moments stored in bf16, ``LowPrecisionMomentsAdamW``), ``offload``
  (megatron-core's optimizer-state offload to host memory, with its distributed optimizer;
  ``offload_fraction=F``), ``recompute=selective|full`` (activation recompute: selective = core
  attention; full = every layer, uniform), ``fp8=tensorwise|rowwise|blockwise|adaptive`` (FP8 linear
  layers; the LM head and the first and last layers stay bf16), e.g. ``ours:mbs=1:bf16moments:gradbf16``.
- ``torchtitan``: torchtitan 0.2.2's own Llama ``Transformer`` (its default training precision:
  fp32 parameters and AdamW states, bf16 autocast), fused AdamW; options in bench/torchtitan_row.py
  (``bf16``, ``compile``, ``mbs=N``, ...).
- ``hf``: ``AutoModelForCausalLM.from_config(..., attn_implementation="sdpa")`` in bf16 with
  ``torch.optim.AdamW`` (bf16 parameters, gradients and states, torch's default foreach path).
  Options: ``mbs=N``, ``gas=N``, ``fused`` (``AdamW(fused=True)``), ``ckpt`` (gradient
  checkpointing), e.g. ``hf:fused:mbs=1:gas=2:ckpt``. A fair table has HF's best configuration
  that fits and an HF row at the same micro-batch as ours.

Every row states its precision recipe (master weights, gradients, AdamW moments) in the table.

Each row draws fresh random tokens every step, runs ``--warmup`` steps, then times ``--steps``
steps with CUDA events and reports the median. MFU = tokens/s x FLOPs/token / 989e12 with
FLOPs/token = 6 N + 6 L H S (N: parameters, embeddings tied counted once; L layers, H hidden size,
S sequence length: causal attention).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

PEAK = 989e12
PEAK_FP8 = 1979e12
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "packages/loongforge-models-llm/src/loongforge_llm/configs/models"


def model_section(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def parse_row(spec: str) -> tuple[str, dict]:
    kind, *opts = spec.split(":")
    out = {}
    for o in opts:
        key, _, value = o.partition("=")
        out[key] = value if value else True
    return kind, out


def flops_per_token(provider, seq: int) -> float:
    a = provider.args
    return 6 * provider.num_parameters() + 6 * a.num_hidden_layers * a.hidden_size * seq


class Clock:
    """CUDA events on the GPU (asynchronous work), the host clock on the CPU (smoke runs)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


#: Kernel-name patterns of the profile's categories, first match wins.
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention", "attn")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "reduce_kernel")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas", "splitk")),
    ("triton", ("triton", "_kernel")),
    ("copy/fill", ("copy", "memcpy", "memset", "fill", "cat")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "elementwise/other")


def profile_steps(step, n: int = 2) -> dict:
    """GPU kernel time of ``n`` steps by class and by kernel (per step, ms) with torch.profiler, and
    (``n`` more steps, recording ops and shapes) matmul TFLOP/s and copies by shape."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    # host-side op records with shapes slow the host down: a separate pass, used only for the tables
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as ops:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    by_kernel: dict[str, list] = {}
    spans = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and not evt.name.startswith(("##", "Optimizer.")):
            entry = by_kernel.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.time_range.elapsed_us() / 1e3 / n
            entry[1] += 1
            spans.append((evt.time_range.start, evt.time_range.end, evt.name))
    # GPU idle time between kernels (the host not keeping up, or waiting on a sync), by the kernel after it
    spans.sort()
    gaps, reach = [], spans[0][1] if spans else 0
    for start, end, name in spans[1:]:
        if start > reach:
            gaps.append((start - reach, name))
        reach = max(reach, end)
    idle_after: dict[str, float] = {}
    for us, name in gaps:
        if us > 20:
            idle_after[name[:60]] = idle_after.get(name[:60], 0.0) + us / 1e3 / n
    by_class: dict[str, float] = {}
    for name, (ms, _) in by_kernel.items():
        by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + ms
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    return {"gpu_ms": sum(by_class.values()), "by_class": by_class, "matmuls": matmul_table(ops, n),
            "copies": copy_table(ops, n),
            "idle_ms": sum(us for us, _ in gaps) / 1e3 / n,
            "idle_before": sorted(idle_after.items(), key=lambda kv: -kv[1])[:8],
            "top": [(name[:110], round(ms, 2), count // n) for name, (ms, count) in top]}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def matmul_table(prof, n: int) -> list:
    """Per matmul shape (aten mm/addmm/addmm_/bmm/baddbmm with recorded input shapes): calls per step, GPU
    ms per step and achieved TFLOP/s (2 M N K per product), slowest total first."""
    rows = []
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key not in MATMUL_OPS or not avg.input_shapes:
            continue
        first = 0 if avg.key in ("aten::mm", "aten::bmm") else 1  # after the added matrix
        shapes = [tuple(s) for s in avg.input_shapes[first:first + 2]]
        if len(shapes) < 2 or min(len(s) for s in shapes) < 2:
            continue
        (*batch, m, k), (*_, k2, n_) = shapes
        flops = 2 * m * n_ * k * (batch[0] if batch else 1)
        ms = avg.device_time_total / 1e3 / n  # the op's kernels, per step
        if ms > 0:
            rows.append((f"{avg.key[6:]} {m}x{k} @ {k2}x{n_}", avg.count // n, round(ms, 2),
                         round(flops * (avg.count / n) / (ms / 1e3) / 1e12, 1)))
    return sorted(rows, key=lambda r: -r[2])[:20]


def copy_table(prof, n: int) -> list:
    """The aten copy/add/cat/fill ops by GPU time per step, with their input shapes (what the
    elementwise kernels in the kernel table belong to)."""
    rows = []
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key in ("aten::copy_", "aten::add_", "aten::add", "aten::cat", "aten::fill_", "aten::mul",
                       "aten::mul_", "aten::zero_", "aten::clone", "aten::contiguous"):
            ms = avg.self_device_time_total / 1e3 / n
            if ms > 0.2:
                rows.append((f"{avg.key[6:]} {avg.input_shapes}"[:140], avg.count // n, round(ms, 2)))
    return sorted(rows, key=lambda r: -r[2])[:15]


def time_steps(step, clock: Clock, warmup: int, steps: int, profile: bool = False) -> dict:
    """Run ``step()`` (returns (loss, mark after backward)); median ms per step and to that mark,
    and (``profile``) the kernel-time breakdown of two more steps."""
    for _ in range(warmup):
        step()
    clock.sync()
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    totals, fwdbwd, losses = [], [], []
    for _ in range(steps):
        start = clock.mark()
        loss, mid = step()
        end = clock.mark()
        clock.sync()
        totals.append(clock.ms(start, end))
        fwdbwd.append(clock.ms(start, mid))
        losses.append(float(loss))
    kernels = profile_steps(step) if profile and clock.cuda else None
    return {
        "kernels": kernels,
        "ms": statistics.median(totals),
        "ms_spread": (min(totals), max(totals)),
        "fwdbwd_ms": statistics.median(fwdbwd),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else float("nan"),
        "loss": (losses[0], losses[-1]),
    }


# --- ours ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def megatron_world(backend, cuda: bool):
    """One-rank megatron-core: NCCL and the CUDA backend active, or (smoke runs) gloo with the CPU
    backend's adaptations plus the CUDA backend's RoPE and weight-gradient patches."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not cuda:
        from loongforge.testing import single_process_megatron
        from loongforge_cuda.modules import rope_patch
        from loongforge_cuda.wgrad import wgrad_accumulation_patch

        with single_process_megatron(), rope_patch(lambda: backend.kernel("rope")), wgrad_accumulation_patch():
            yield
        return
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    with backend.activate(0):
        yield


def row_ours(section: dict, args, opts: dict) -> dict:
    from loongforge.model_provider import RunSettings
    from loongforge.trainer.multi_tensor import foreach_multi_tensor_ops
    from loongforge.trainer.optim import use_fused_adam
    from loongforge_cuda.attention import ENV_FORCE, MeasuredSDPAttention
    from loongforge_cuda.backend import CudaBackend
    from loongforge_cuda.plugin import loongforge_register_kernels
    from loongforge_kernels.plugin import KERNELS
    from loongforge_llm.provider import LLMProvider
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    mbs, seq = int(opts.get("mbs", args.mbs)), args.seq
    if opts.get("sdpa"):
        os.environ[ENV_FORCE] = opts["sdpa"]
    else:
        os.environ.pop(ENV_FORCE, None)
    MeasuredSDPAttention.choices.clear()  # each row times its own candidates; its report shows only its shapes
    MeasuredSDPAttention.reports.clear()
    backend = CudaBackend()
    nokernels = bool(opts.get("nokernels"))
    if not nokernels:
        disable = [d for d in str(opts.get("disable", "")).split("+") if d]
        backend.configure_kernels([*KERNELS, *loongforge_register_kernels()], disable)
    provider = LLMProvider(section)
    recompute = opts.get("recompute")
    run = RunSettings(bf16=True, seq_length=seq, recompute_granularity=recompute or None,
                      recompute_method="uniform" if recompute == "full" else None,
                      recompute_num_layers=1 if recompute == "full" else None)
    cuda = args.device == "cuda"
    offload, distopt = bool(opts.get("offload")), bool(opts.get("distopt") or opts.get("offload"))
    with megatron_world(backend, cuda):
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = provider.transformer_config(run)
        if nokernels:  # the plain local spec, torch's SDPA choice: the "no fusions" reference
            from loongforge.modules.layer_spec import local_sdpa_spec

            backend.layer_spec = lambda config, model_cfg: local_sdpa_spec(config)
        model = provider.build(config, run, backend=backend).to(args.device)
        if opts.get("compile"):  # each transformer layer through torch.compile (in place)
            for layer in model.decoder.layers:
                layer.compile()
        model = Float16Module(config, model)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=not opts.get("gradbf16"), overlap_grad_reduce=False,
            use_distributed_optimizer=distopt)
        model = DistributedDataParallel(config, ddp_cfg, model)
        if opts.get("fp8"):  # FP8 linear layers, as the backend applies precision.fp8 (default exclude list)
            backend.fp8 = {"recipe": opts["fp8"], "exclude": ["output_layer", "first", "last"], "error_budget": 0.08}
        if not opts.get("nowgradfusion"):
            backend.after_data_parallel([model])
        elif opts.get("fp8"):
            from loongforge_cuda.fp8 import apply_fp8

            apply_fp8([model], opts["fp8"], impl="scaled_mm" if cuda else "emulated")
        if opts.get("fp8") and not cuda:  # CPU smoke run: torch's CPU scaled matmul lacks blockwise
            for m in backend.fp8_layers.applied.values() if backend.fp8_layers else ():
                m._forward_impl.impl = "emulated"
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0,
            bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=distopt,
            **({"optimizer_cpu_offload": True, "optimizer_offload_fraction": float(opts.get("offload_fraction", 1.0))}
               if offload else {})), [model])
        moments = (torch.bfloat16, torch.bfloat16) if opts.get("bf16moments") else None
        if not opts.get("foreach") and not offload:
            use_fused_adam(optimizer, adamw_step=None if opts.get("torchadam") else backend.kernel("adamw_step"),
                           moments=moments)
        # megatron-core's own per-tensor fallbacks (row option mcore_ops) or torch's foreach ops
        multi_tensor_ops = contextlib.nullcontext if opts.get("mcore_ops") else foreach_multi_tensor_ops
        vocab = provider.args.vocab_size

        accumulate = int(opts.get("gas", 1))

        def step():
            model.zero_grad_buffer()
            optimizer.zero_grad()
            total = 0.0
            for _ in range(accumulate):  # micro-batches summed into the fp32 gradient buffer
                tokens = torch.randint(0, vocab, (mbs, seq + 1), device=args.device)
                # the fused LM-head loss, when on, is the model's own output_processor (provider.build)
                per_token = model(tokens[:, :-1], None, None, labels=tokens[:, 1:])
                loss = per_token.float().mean() / accumulate
                loss.backward()
                total = total + loss.detach()
            model.finish_grad_sync()
            mid = clock.mark()
            with multi_tensor_ops():
                ok, _, _ = optimizer.step()
            assert ok, "optimizer step skipped"
            return total, mid

        clock = Clock(cuda)
        result = time_steps(step, clock, args.warmup, args.steps, profile=args.profile)
        result["sdpa"] = {str(k[0]): (str(v), {str(c): t for c, t in (MeasuredSDPAttention.reports.get(k) or {}).items()})
                          for k, v in MeasuredSDPAttention.choices.items()}
    moments = "bf16" if opts.get("bf16moments") else "fp32"
    result.update(tokens=accumulate * mbs * seq, flops_token=flops_per_token(provider, seq), mbs=mbs,
                  fp8=opts.get("fp8"),
                  recipe=(f"fp32 master{' (host)' if offload else ''}, grads {'bf16' if opts.get('gradbf16') else 'fp32'}, "
                          f"moments {moments}{' (host)' if offload else ''}; "
                          f"GEMMs {'fp8 ' + opts['fp8'] + ' (LM head, first/last layer bf16)' if opts.get('fp8') else 'bf16'}"
                          + (f"; recompute {recompute}" if recompute else "")))
    return result


# --- HF Transformers ----------------------------------------------------------------------------


def row_hf(section: dict, args, opts: dict) -> dict:
    """HF Transformers in bf16 (parameters, gradients and AdamW moments all bf16, no fp32 master).
    Options: ``mbs=N``, ``gas=N`` (N micro-batches per optimizer step, gradients summed in the bf16
    ``.grad``), ``fused`` (``torch.optim.AdamW(fused=True)`` instead of torch's default foreach
    path), ``ckpt`` (HF gradient checkpointing of every decoder layer, non-reentrant)."""
    import transformers
    from loongforge_llm.provider import provider_for

    mbs, seq = int(opts.get("mbs", args.mbs)), args.seq
    accumulate = int(opts.get("gas", 1))
    provider = provider_for(section)  # the family's own provider (an MoE family's for bench/moe_step.py)
    cfg = provider.hf_config()
    hf_config = transformers.CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="sdpa", torch_dtype=torch.bfloat16).to(args.device)
    model.train()
    if opts.get("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = bool(opts.get("fused"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                  **({"fused": True} if fused else {}))
    vocab = provider.args.vocab_size

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accumulate):
            tokens = torch.randint(0, vocab, (mbs, seq), device=args.device)
            loss = model(input_ids=tokens, labels=tokens).loss / accumulate  # HF shifts the labels itself
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        mid = clock.mark()
        optimizer.step()
        return total, mid

    clock = Clock(args.device == "cuda")
    result = time_steps(step, clock, args.warmup, args.steps, profile=args.profile)
    result.update(tokens=accumulate * mbs * seq, flops_token=flops_per_token(provider, seq), mbs=mbs,
                  recipe="bf16 params (no master), grads bf16, moments bf16; AdamW "
                         + ("fused" if fused else "foreach") + ("; ckpt all layers" if opts.get("ckpt") else ""))
    return result


def row_torchtitan(section: dict, args, opts: dict) -> dict:
    """torchtitan's Llama (bench/torchtitan_row.py; its wheels: bench/fetch_torchtitan_wheels.sh)."""
    from torchtitan_row import row_torchtitan as row

    return row(section, args, opts)


ROWS = {"ours": row_ours, "hf": row_hf, "torchtitan": row_torchtitan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3/llama3.2_1b", help="configs/models/<family>/<name>")
    parser.add_argument("--rows", default="ours,hf")
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="also print each row's GPU kernel time by class and its top kernels (torch.profiler)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of the same code (gloo, CPU backend), no meaningful speed")
    args = parser.parse_args()
    section = model_section(args.model)
    results = []
    for spec in args.rows.split(","):
        kind, opts = parse_row(spec)
        t0 = time.time()
        try:
            r = ROWS[kind](section, args, opts)
            r["row"] = spec
            r["wall_s"] = time.time() - t0
            r["tok_s"] = r["tokens"] / (r["ms"] / 1e3)
            r["tflops"] = r["tok_s"] * r["flops_token"] / 1e12
            r["mfu"] = r["tflops"] * 1e12 / PEAK
            print(f"[{spec}] {json.dumps(r, default=str)}", flush=True)
        except Exception as exc:  # a row that fails (OOM, missing kernel) must not hide the others
            traceback.print_exc()
            r = {"row": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(f"[{spec}] FAILED {r['error']}", flush=True)
        results.append(r)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    fpt = next((r["flops_token"] for r in results if "flops_token" in r), 0.0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run)"
    print(f"\n{args.model}, seq {args.seq}, {device}; "
          f"MFU = tok/s x {fpt / 1e9:.3f} GFLOP/token (6N + 6LHS) / 989 TFLOP/s (bf16 dense peak; FP8 rows "
          f"also / 1979 TFLOP/s, the FP8 dense peak, in brackets); median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'row':32} {'mbs':>3} {'ms/step':>9} {'fwd+bwd':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}  loss")
    for r in results:
        if "error" in r:
            print(f"{r['row']:32} FAILED: {r['error']}")
            continue
        if not all(math.isfinite(x) for x in r["loss"]):  # NaN/inf data also run GEMMs faster (less power)
            print(f"{r['row']:32} INVALID: non-finite loss {r['loss']} (timings not comparable)")
            continue
        fb = f"{r['fwdbwd_ms']:.1f}" if r.get("fwdbwd_ms") else "-"
        print(f"{r['row']:32} {r['mbs']:>3} {r['ms']:>9.1f} {fb:>8} {r['tok_s']:>9,.0f} {r['tflops']:>8.1f} "
              f"{100 * r['mfu']:>5.1f}% {r['peak_gib']:>9.1f}  {r['loss'][0]:.3f}->{r['loss'][1]:.3f}"
              + (f"  [MFU {100 * r['mfu'] * PEAK / PEAK_FP8:.1f}% of FP8 peak]" if r.get("fp8") else ""))
    print("precision recipe per row (master weights, gradients, AdamW moments, GEMMs):")
    for r in results:
        if r.get("recipe"):
            print(f"  {r['row']:32} {r['recipe']}")
    for r in results:
        if r.get("kernels"):
            k = r["kernels"]
            print(f"\n[{r['row']}] GPU kernel time per step {k['gpu_ms']:.1f} ms of {r['ms']:.1f} ms: "
                  + ", ".join(f"{c} {ms:.1f}" for c, ms in sorted(k["by_class"].items(), key=lambda kv: -kv[1])))
            print(f"  GPU idle between kernels {k['idle_ms']:.1f} ms per step; largest shares (gaps > 20 us), "
                  "by the kernel that ends them: " + "; ".join(f"{name} {ms:.2f}" for name, ms in k["idle_before"]))
            for name, ms, count in k["top"]:
                print(f"  {ms:8.2f} ms {count:5d}x  {name}")
            print("  matmuls by shape (calls/step, GPU ms/step, TFLOP/s):")
            for shape, count, ms, tflops in k["matmuls"]:
                print(f"  {ms:8.2f} ms {count:5d}x {tflops:7.1f} TFLOP/s  {shape}")
            print("  copies, adds, fills by input shapes (calls/step, GPU ms/step):")
            for shape, count, ms in k["copies"]:
                print(f"  {ms:8.2f} ms {count:5d}x  {shape}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
