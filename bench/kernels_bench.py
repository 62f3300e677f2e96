"""Benchmark the loongforge-kernels fused ops against their torch references on CUDA.

Each row times forward + backward (``torch.autograd.grad`` on a fixed upstream gradient) with
``triton.testing.do_bench`` (warm-up, then the median), and measures the peak memory one step
allocates above its inputs. Usage::

    python bench/kernels_bench.py                    # all ops, bf16
    python bench/kernels_bench.py --ops rmsnorm,fused_linear_ce --dtype fp32 --rep 200
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], list]  # -> inputs; tensors that require grad are differentiated
    fused: Callable
    reference: Callable


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, device="cuda") * scale).to(dtype).requires_grad_(True)


def _rope_tables(s, d):
    inv = 1.0 / 1_000_000.0 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)
    emb = torch.outer(torch.arange(s, device="cuda", dtype=torch.float32), inv).repeat(1, 2)
    return emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]


def build_cases(dtype: torch.dtype) -> list[Case]:
    from loongforge_kernels import fused_linear_ce as ce
    from loongforge_kernels import rmsnorm, rope, swiglu

    cases = []
    for shape in [(8192, 2048), (8192, 4096), (4096, 8192)]:
        cases.append(
            Case(
                "rmsnorm",
                str(list(shape)),
                lambda shape=shape: [_leaf(shape, dtype), _leaf(shape[-1:], dtype), 1e-6],
                rmsnorm.rms_norm_triton,
                rmsnorm.rms_norm_reference,
            )
        )
    for shape in [(8192, 2 * 6144), (8192, 2 * 11008)]:
        cases.append(
            Case(
                "swiglu",
                str(list(shape)),
                lambda shape=shape: [_leaf(shape, dtype)],
                swiglu.swiglu_triton,
                swiglu.swiglu_reference,
            )
        )
    for shape in [(4096, 2, 32, 128), (8192, 1, 8, 128)]:
        cases.append(
            Case(
                "rope",
                str(list(shape)),
                lambda shape=shape: [_leaf(shape, dtype), *_rope_tables(shape[0], shape[-1])],
                rope.apply_rope_triton,
                rope.apply_rope_reference,
            )
        )
        cases.append(
            Case(
                "qk_norm_rope",
                str(list(shape)),
                lambda shape=shape: [
                    _leaf(shape, dtype),
                    _leaf(shape[-1:], dtype),
                    1e-6,
                    *_rope_tables(shape[0], shape[-1]),
                ],
                rope.qk_norm_rope_triton,
                rope.qk_norm_rope_reference,
            )
        )

    def ce_inputs(n, h, v):
        labels = torch.randint(0, v, (n,), device="cuda")
        labels[::10] = -100
        return [_leaf((n, h), dtype), _leaf((v, h), dtype, h**-0.5), labels]

    def bf16_matmul_ce(hidden, weight, labels):
        """The usual unfused LM head: logits in the input dtype, cross-entropy upcast to fp32."""
        return F.cross_entropy((hidden @ weight.t()).float(), labels)

    for n, h, v in [(8192, 2048, 128256), (8192, 4096, 151936)]:
        shape = f"N={n} H={h} V={v}"
        make = lambda n=n, h=h, v=v: ce_inputs(n, h, v)  # noqa: E731
        cases.append(
            Case(
                "fused_linear_ce",
                shape,
                make,
                ce.fused_linear_cross_entropy_triton,
                ce.fused_linear_cross_entropy_reference,
            )
        )
        if dtype != torch.float32:
            cases.append(
                Case(
                    "fused_linear_ce vs mm+CE",
                    shape,
                    make,
                    ce.fused_linear_cross_entropy_triton,
                    bf16_matmul_ce,
                )
            )
    return cases


def _step(fn, inputs):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*inputs)
    grad_out = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)

    def step():
        torch.autograd.grad(fn(*inputs), leaves, grad_out)

    return step


def _peak_mib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=25, help="warm-up time, ms")
    parser.add_argument("--rep", type=int, default=100, help="measurement time, ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_bench needs a CUDA device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    wanted = {o.strip() for o in args.ops.split(",") if o.strip()}

    header = (
        f"{'op':<26}{'shape':<26}{'ref ms':>9}{'fused ms':>10}{'speedup':>9}{'ref MiB':>10}{'fused MiB':>11}"
    )
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  fwd+bwd, median of do_bench")
    print(header)
    print("-" * len(header))
    for case in build_cases(dtype):
        if wanted and case.op.split()[0] not in wanted:
            continue
        torch.manual_seed(0)
        inputs = case.make()
        row = {}
        for label, fn in (("ref", case.reference), ("fused", case.fused)):
            step = _step(fn, inputs)
            step()  # compile / autotune / allocate outside the measurement
            row[label + "_mib"] = _peak_mib(step)
            row[label + "_ms"] = triton.testing.do_bench(
                step, warmup=args.warmup, rep=args.rep, return_mode="median"
            )
            del step
            torch.cuda.empty_cache()
        print(
            f"{case.op:<26}{case.shape:<26}{row['ref_ms']:>9.3f}{row['fused_ms']:>10.3f}"
            f"{row['ref_ms'] / row['fused_ms']:>8.2f}x{row['ref_mib']:>10.0f}{row['fused_mib']:>11.0f}"
        )
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
