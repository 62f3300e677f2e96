"""One DeepSeek-V3.2 attention layer (MLA + DSA) step on one GPU: DSA with the TileLang indexer vs
the unfused torch DSA path vs dense MLA (SDPA).

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python bench/dsa_step.py            # 8K / 32K / 64K tokens
    ... python bench/dsa_step.py --seqs 8192 --rows kernels,dense
    ... python bench/dsa_step.py --tiny                                                # CPU smoke run

Shape: transformers' ``DeepseekV32Config`` defaults (hidden 7168, 128 heads, q_lora 1536, kv_lora
512, qk_rope 64, qk_nope 128, v 128, indexer 64 heads x 128, index_topk 2048), ``--layers``
attention layers (default 1; no MLP/MoE), bf16, batch 1, one sequence of S tokens.
A step = forward + backward of ``mean(out**2)`` through the layer(s); no optimizer. The indexer
runs without gradient (the sparse stage detaches its input) and its KL loss is NOT in the step.

Rows (``--rows``):
- ``kernels``: indexer scores by ``loongforge_kernels.dsa.lightning_indexer`` (TileLang on CUDA),
  chunked top-k, then ``loongforge_kernels.dsa.sparse_mla_forward`` (TileLang, absorbed MLA) in
  the forward; the backward recomputes the torch sparse attention per chunk (no backward kernel).
- ``torch``: the same with the indexer scores as a bf16 einsum (unfused torch DSA path).
- ``dense``: dense causal MLA, expanded k/v, ``F.scaled_dot_product_attention``.

MFU = tokens/s x FLOPs/token / 989e12 (H100 bf16 dense peak). FLOPs/token = 6 x N_proj (projection
weights a token goes through, the indexer's counted once at 2x: forward only) + the attention core:
dense 6 x H x (192 + 128) x S/2, sparse 6 x H x (576 + 512) x min(topk, S/2), indexer core
2 x 64 x 128 x S/2 (forward only). Causal averages; approximate by construction.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
for src in (ROOT / "packages").glob("*/src"):
    sys.path.insert(0, str(src))

from loongforge_kernels.dsa import lightning_indexer, sparse_mla_forward  # noqa: E402
from loongforge_llm.dsa.mla import DSAMLAttention, MLADims  # noqa: E402
from loongforge_llm.dsa.sparse_attention import sparse_mla_attention  # noqa: E402
from loongforge_llm.dsa.topk import select_topk  # noqa: E402

PEAK = 989e12


def dims(tiny: bool) -> MLADims:
    if tiny:
        return MLADims(64, 4, 32, 32, 16, 8, 16, 4, 16, index_topk=16)
    from transformers import DeepseekV32Config

    return MLADims.from_hf(DeepseekV32Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def indexer_topk_rows(layer: DSAMLAttention, hidden, q_lora, cos, sin, row: str, chunk: int):
    with torch.no_grad():
        q, k, w = layer.indexer.project(hidden, q_lora, cos, sin)
        scale, parts = layer.indexer.softmax_scale, []
        for a in range(0, q.shape[1], chunk):
            if row == "kernels":
                sc = lightning_indexer(q[:, a:a + chunk], k, w[:, a:a + chunk], scale)
            else:  # unfused torch: bf16 GEMM, fp32 relu/weights/sum
                logits = torch.einsum("bshd,btd->bsht", q[:, a:a + chunk], k).float() * scale
                sc = torch.einsum("bsh,bsht->bst", w[:, a:a + chunk].float(), torch.relu(logits))
            parts.append(select_topk(sc, layer.d.index_topk, query_offset=a))
        return torch.cat(parts, dim=1)


class KernelSparseMLA(torch.autograd.Function):
    """Forward: the TileLang sparse MLA kernel; backward: recompute the torch path per chunk."""

    @staticmethod
    def forward(ctx, q, kv, idx, scale, dv, chunk):
        ctx.save_for_backward(q, kv, idx)
        ctx.scale, ctx.dv, ctx.chunk = scale, dv, chunk
        return sparse_mla_forward(q, kv, idx, scale, dv)[0]

    @staticmethod
    def backward(ctx, grad):
        q, kv, idx = ctx.saved_tensors
        dq, dkv = torch.zeros_like(q), torch.zeros_like(kv, dtype=torch.float32)
        for a in range(0, q.shape[1], ctx.chunk):
            with torch.enable_grad():
                qc, kvc = q[:, a:a + ctx.chunk].detach().requires_grad_(), kv.detach().requires_grad_()
                k3 = kvc.unsqueeze(2)
                out = sparse_mla_attention(qc, k3, k3[..., :ctx.dv], idx[:, a:a + ctx.chunk], ctx.scale)
                gq, gkv = torch.autograd.grad(out, (qc, kvc), grad[:, a:a + ctx.chunk])
            dq[:, a:a + ctx.chunk] = gq
            dkv += gkv.float()
        return dq, dkv.to(kv.dtype), None, None, None, None


def layer_forward(layer: DSAMLAttention, x, row: str, chunk: int):
    from loongforge_llm.dsa.indexer import rope_cos_sin

    b, s, _ = x.shape
    cos, sin = rope_cos_sin(torch.arange(s, device=x.device).expand(b, s), layer.d.qk_rope_head_dim)
    if row == "dense":
        _, q, k, v = layer.qkv(x, cos, sin, absorbed=False)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=layer.scale).transpose(1, 2)
        return layer.out_proj(out, absorbed=False)
    q_lora, q, k, v = layer.qkv(x, cos, sin, absorbed=True)
    idx = indexer_topk_rows(layer, x.detach(), q_lora.detach(), cos, sin, row, chunk)
    if row == "kernels":  # k = [latent | rope] shared by the heads, v = latent = k[..., :kv_lora]
        out = KernelSparseMLA.apply(q, k[:, :, 0], idx, layer.scale, layer.d.kv_lora_rank, chunk)
        return layer.out_proj(out, absorbed=True)
    outs = [checkpoint(sparse_mla_attention, q[:, a:a + chunk], k, v, idx[:, a:a + chunk], layer.scale,
                       use_reentrant=False) for a in range(0, s, chunk)]
    return layer.out_proj(torch.cat(outs, dim=1), absorbed=True)


def flops_per_token(d: MLADims, s: int, row: str) -> float:
    h = d.num_heads
    proj = (d.hidden_size * d.q_lora_rank + d.q_lora_rank * h * (d.qk_nope_head_dim + d.qk_rope_head_dim)
            + d.hidden_size * (d.kv_lora_rank + d.qk_rope_head_dim) + d.kv_lora_rank * h * (d.qk_nope_head_dim + d.v_head_dim)
            + h * d.v_head_dim * d.hidden_size)
    if row == "dense":
        return 6 * proj + 6 * h * (d.qk_nope_head_dim + d.qk_rope_head_dim + d.v_head_dim) * s / 2
    idx_proj = d.q_lora_rank * d.index_n_heads * d.index_head_dim + d.hidden_size * (d.index_head_dim + d.index_n_heads)
    core = 6 * h * (2 * d.kv_lora_rank + d.qk_rope_head_dim) * min(d.index_topk, s / 2)
    return 6 * proj + 2 * idx_proj + core + 2 * d.index_n_heads * d.index_head_dim * s / 2


def run_row(layers, d, s, row, args, dev, dtype) -> dict:
    torch.manual_seed(s)  # the same input for every row: kernels and torch rows give the same loss
    x0 = torch.randn(1, s, d.hidden_size, device=dev, dtype=dtype)

    def step():
        x = x0
        for layer in layers:
            x = x + layer_forward(layer, x, row, args.chunk)
        loss = x.float().square().mean()
        loss.backward()
        return loss

    cuda = dev.type == "cuda"
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    try:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000 / args.steps
    except torch.OutOfMemoryError:
        return {"row": row, "seq": s, "error": "OOM"}
    finally:
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    tok_s = s / (ms / 1000)
    return {"row": row, "seq": s, "ms": ms, "tok_s": tok_s, "loss": loss.item(),
            "mfu": tok_s * flops_per_token(d, s, row) * len(layers) / PEAK,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="8192,32768,65536")
    p.add_argument("--rows", default="kernels,torch,dense")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--chunk", type=int, default=256, help="query chunk of the indexer top-k and sparse attention")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny dims, fp32, short sequences")
    args = p.parse_args()
    if args.tiny:
        dev, dtype, seqs, args.chunk = torch.device("cpu"), torch.float32, [64, 128], 32
    else:
        dev, dtype, seqs = torch.device("cuda"), torch.bfloat16, [int(v) for v in args.seqs.split(",")]
    d = dims(args.tiny)
    torch.manual_seed(0)
    layers = [DSAMLAttention(d).to(dev, dtype) for _ in range(args.layers)]
    for layer in layers:
        with torch.no_grad():
            for prm in layer.parameters():
                if prm.dim() > 1:
                    prm.normal_(0.0, prm.shape[-1] ** -0.5)
    if args.tiny:  # the kernels row's autograd (kernel forward, recomputed backward) == the torch row's
        grads = {}
        for row in ("kernels", "torch"):
            layers[0].zero_grad(set_to_none=True)
            torch.manual_seed(1)
            x = torch.randn(1, 48, d.hidden_size, requires_grad=True)
            layer_forward(layers[0], x, row, args.chunk).square().mean().backward()
            grads[row] = [x.grad] + [p.grad for p in layers[0].parameters() if p.grad is not None]
        assert len(grads["kernels"]) == len(grads["torch"]) > 1
        for a, b in zip(grads["kernels"], grads["torch"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        print("tiny check: kernels-row gradients == torch-row gradients")
    results = []
    for s in seqs:
        for row in args.rows.split(","):
            r = run_row(layers, d, s, row, args, dev, dtype)
            print(r, flush=True)
            results.append(r)
    print(f"\nDeepSeek-V3.2 attention x{args.layers} (hidden {d.hidden_size}, {d.num_heads} heads, topk "
          f"{d.index_topk}), {'fp32 CPU (smoke)' if args.tiny else 'bf16 ' + torch.cuda.get_device_name()}")
    print("MFU = tokens/s x FLOPs/token / 989e12; FLOPs/token as in this script's docstring")
    print(f"{'row':8} {'seq':>6} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}  loss")
    for r in results:
        if "error" in r:
            print(f"{r['row']:8} {r['seq']:>6} {r['error']}")
        else:
            print(f"{r['row']:8} {r['seq']:>6} {r['ms']:>9.1f} {r['tok_s']:>10,.0f} {100 * r['mfu']:>5.1f}% "
                  f"{r['peak_gib']:>9.2f}  {r['loss']:.6g}")


if __name__ == "__main__":
    main()
