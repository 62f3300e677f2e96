"""LoongForge plugin entry: registers the fused kernels with their torch references.

Imports neither torch nor triton (plugin discovery imports every plugin); the callables are named
by import path and resolved only when used.
"""

from loongforge import hookimpl
from loongforge.registry import Kernel

LOONGFORGE_API_VERSION = "1.0"

_PKG = "loongforge_kernels"

KERNELS = (
    Kernel(
        name="triton_rmsnorm",
        op="rmsnorm",
        impl=f"{_PKG}.rmsnorm:rms_norm",
        reference=f"{_PKG}.rmsnorm:rms_norm_reference",
        device_types=("cuda",),
        description="RMSNorm over the last dim, HF Llama numerics; fused fwd+bwd (dW in-kernel partials).",
    ),
    Kernel(
        name="triton_add_rmsnorm",
        op="add_rmsnorm",
        impl=f"{_PKG}.rmsnorm:add_rms_norm",
        reference=f"{_PKG}.rmsnorm:add_rms_norm_reference",
        device_types=("cuda",),
        description="Pre-norm residual add + RMSNorm -> (y, h): one kernel writes both; one backward "
                    "kernel gives dh + dnorm for x and residual, and dW.",
    ),
    Kernel(
        name="triton_swiglu",
        op="swiglu",
        impl=f"{_PKG}.swiglu:swiglu",
        reference=f"{_PKG}.swiglu:swiglu_reference",
        device_types=("cuda",),
        description="silu(gate) * up on megatron's fused [gate | up] fc1 output; fused fwd+bwd.",
    ),
    Kernel(
        name="triton_rope",
        op="rope",
        impl=f"{_PKG}.rope:apply_rope",
        reference=f"{_PKG}.rope:apply_rope_reference",
        device_types=("cuda",),
        description="Rotate-half RoPE on [S, B, H, D] (partial rotary supported); fused fwd+bwd.",
    ),
    Kernel(
        name="triton_qkv_rope",
        op="qkv_rope",
        impl=f"{_PKG}.rope:qkv_rope",
        reference=f"{_PKG}.rope:qkv_rope_reference",
        device_types=("cuda",),
        description="q/k RoPE (after Qwen3's per-head QK RMSNorm when present) read from and, in "
                    "backward, written into megatron's fused QKV layout; fused fwd+bwd.",
    ),
    Kernel(
        name="triton_flash_attention",
        op="flash_attention",
        impl=f"{_PKG}.flash_attention:flash_attention_triton",
        reference=f"{_PKG}.flash_attention:flash_attention_reference",
        device_types=("cuda",),
        description="Causal/full self-attention on [B, H, S, D] views, grouped KV heads; fwd+bwd. "
                    "A candidate in the CUDA backend's per-shape SDPA timing.",
    ),
    Kernel(
        name="triton_fused_linear_ce",
        op="fused_linear_cross_entropy",
        impl=f"{_PKG}.fused_linear_ce:fused_linear_cross_entropy",
        reference=f"{_PKG}.fused_linear_ce:fused_linear_cross_entropy_reference",
        device_types=("cuda",),
        description="LM-head matmul + cross-entropy in token chunks; never materialises [N, V] logits.",
    ),
    Kernel(
        name="triton_adamw",
        op="adamw_step",
        impl=f"{_PKG}.adamw:adamw_step",
        reference=f"{_PKG}.adamw:adamw_step_reference",
        device_types=("cuda",),
        description="torch AdamW over all fp32 master params in one launch, writing their bf16 model "
                    "copies in the same pass; the clip factor divides grads on load.",
    ),
    Kernel(
        name="tilelang_lightning_indexer",
        op="lightning_indexer",
        impl=f"{_PKG}.dsa:lightning_indexer",
        reference=f"{_PKG}.dsa:lightning_indexer_reference",
        device_types=("cuda",),
        description="DeepSeek-V3.2 DSA indexer scores sum_h w * relu(scale * q . k) (TileLang, forward only).",
    ),
    Kernel(
        name="tilelang_sparse_mla_forward",
        op="sparse_mla_forward",
        impl=f"{_PKG}.dsa:sparse_mla_forward",
        reference=f"{_PKG}.dsa:sparse_mla_forward_reference",
        device_types=("cuda",),
        description="DeepSeek-V3.2 DSA absorbed MLA over each query's top-k keys -> (out, lse) (TileLang, forward only).",
    ),
)


@hookimpl
def loongforge_register_kernels():
    return list(KERNELS)
