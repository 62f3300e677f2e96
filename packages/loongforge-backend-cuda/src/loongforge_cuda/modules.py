"""The fused kernels plugged into megatron-core's local GPT layer.

- RMSNorm: :func:`fused_norm` builds modules with the same parameter (``weight``) and the same
  sequence-parallel mark as ``loongforge.modules.norm.LocalNorm``, so checkpoints and weight
  mappings do not change.
- SwiGLU: :func:`fused_swiglu_mlp` is megatron's ``MLP`` with ``silu(gate) * up`` in one kernel
  (megatron's own fusion is a jit-scripted bias+SwiGLU).
- RoPE: megatron's attention calls ``apply_rotary_pos_emb`` from its module namespace; the backend
  swaps it while active (:func:`rope_patch`) for one that runs the fused kernel where it applies.
- q/k RoPE (and Qwen3's QK-norm): megatron's ``SelfAttention`` becomes the one of
  :mod:`loongforge_cuda.qkv_rope`, which reads q and k from the fused QKV projection in one kernel
  call per layer (no query copy, no gradient concatenation).
- Residual add + pre-MLP RMSNorm: :mod:`loongforge_cuda.residual_norm`'s layer runs them as one
  kernel each way.
- LM-head + cross-entropy: :func:`fused_ce_output_processor` is a ``GPTModel.forward``
  ``output_processor`` that computes the per-token loss in chunks, never materialising the
  ``[tokens, vocab]`` logits.

Every piece falls back to megatron's own path for configurations the kernel does not cover.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm over the last dim through ``rms_norm(x, weight, eps)`` (a registered kernel).

    The layer before may already have normalised ``x`` with this norm's weight, fused with the
    residual add that produced ``x`` (:mod:`loongforge_cuda.residual_norm`): it leaves the result
    in ``handoff`` (:meth:`hand_over`) and the next call with that very tensor, unchanged since and
    with the weight unchanged, returns it."""

    handoff: tuple | None = None

    def __init__(self, hidden_size: int, eps: float, rms_norm):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.rms_norm = rms_norm

    def hand_over(self, x, normed) -> None:
        self.handoff = (x, x._version, self.weight._version, normed)

    def forward(self, x):
        handoff, self.handoff = self.handoff, None
        if handoff is not None and handoff[0] is x and handoff[1:3] == (x._version, self.weight._version):
            return handoff[3]
        return self.rms_norm(x, self.weight, self.eps)


def fused_norm(rms_norm, *, sequence_parallel_mark: bool) -> type:
    """A norm builder (``ModuleSpec`` module) for RMSNorm through ``rms_norm(x, weight, eps)``;
    LayerNorm configs get ``loongforge.modules.norm``'s torch norms."""
    from loongforge.modules.norm import LocalHeadNorm, LocalNorm

    fallback = LocalNorm if sequence_parallel_mark else LocalHeadNorm

    class Builder:
        def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
            if config.normalization != "RMSNorm":
                return fallback(config, hidden_size, eps, **kwargs)
            norm = FusedRMSNorm(hidden_size, eps, rms_norm)
            if sequence_parallel_mark:
                norm.weight.sequence_parallel = bool(config.sequence_parallel)
            return norm

    return Builder


def fused_swiglu_mlp(swiglu) -> type:
    """megatron's ``MLP`` whose gated SiLU runs as ``swiglu(fc1_out)`` (no bias, no per-token scale)."""
    from megatron.core.transformer.mlp import MLP

    class FusedSwiGLUMLP(MLP):
        def _fusable(self) -> bool:
            c = self.config
            return (c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear
                    and not c.use_te_activation_func and not getattr(c, "glu_linear_offset", 0)
                    and getattr(c, "activation_func_clamp_value", None) is None
                    and not getattr(c, "activation_func_fp8_input_store", False))

        def forward(self, hidden_states, per_token_scale=None, **kwargs):
            if per_token_scale is not None or not self._fusable():
                return super().forward(hidden_states, per_token_scale, **kwargs)
            intermediate, _ = self.linear_fc1(hidden_states)
            return self.linear_fc2(swiglu(intermediate))

    return FusedSwiGLUMLP


def _map_layers(spec, fn):
    """Apply ``fn`` to the layer spec, or to every layer of a ``TransformerBlock`` spec."""
    subs = spec.submodules
    if hasattr(subs, "layer_specs"):
        layers = [fn(layer) for layer in subs.layer_specs]
        return dataclasses.replace(spec, submodules=dataclasses.replace(subs, layer_specs=layers))
    return fn(spec)


def _with_mlp_class(mlp, cls):
    """The layer's ``mlp`` entry building ``cls`` instead of megatron's ``MLP``: a ``ModuleSpec``,
    or (megatron-core 0.19) ``functools.partial(MLP.as_mlp_submodule, submodules=...)``."""
    if isinstance(mlp, functools.partial) and getattr(mlp.func, "__name__", "") == "as_mlp_submodule":
        return functools.partial(cls.as_mlp_submodule, *mlp.args, **mlp.keywords)
    if dataclasses.is_dataclass(mlp):
        return dataclasses.replace(mlp, module=cls)
    raise TypeError(f"cannot plug the fused SwiGLU MLP into the layer's mlp spec {mlp!r}")


def apply_kernels(spec, ops: dict):
    """``spec`` (a layer or block spec of ``loongforge.modules.layer_spec``) with the fused
    modules for the operators in ``ops`` (``{op: callable}``)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    norm, swiglu, qkv_rope = ops.get("rmsnorm"), ops.get("swiglu"), ops.get("qkv_rope")
    add_norm = ops.get("add_rmsnorm") if norm is not None else None  # needs the fused norm modules

    def layer(ls):
        if add_norm is not None and ls.module is TransformerLayer:
            from loongforge_cuda.residual_norm import fused_residual_norm_layer

            ls = dataclasses.replace(ls, module=fused_residual_norm_layer(add_norm))
        sub = ls.submodules
        changes = {}
        attn = sub.self_attention
        qk_norms = [n for n in ("q_layernorm", "k_layernorm")
                    if getattr(attn.submodules, n, IdentityOp) not in (IdentityOp, None)]
        if norm is not None:
            hidden_norm = fused_norm(norm, sequence_parallel_mark=True)
            changes.update(input_layernorm=hidden_norm, pre_mlp_layernorm=hidden_norm)
            head_norm = fused_norm(norm, sequence_parallel_mark=False)
            if qk_norms:
                attn = dataclasses.replace(attn, submodules=dataclasses.replace(
                    attn.submodules, **{n: head_norm for n in qk_norms}))
        if qkv_rope is not None and attn.module is SelfAttention:
            from loongforge_cuda.qkv_rope import qkv_rope_attention

            attn = dataclasses.replace(attn, module=qkv_rope_attention(qkv_rope))
        if attn is not sub.self_attention:
            changes["self_attention"] = attn
        if swiglu is not None:
            changes["mlp"] = _with_mlp_class(sub.mlp, fused_swiglu_mlp(swiglu))
        return dataclasses.replace(ls, submodules=dataclasses.replace(sub, **changes)) if changes else ls

    spec = _map_layers(spec, layer)
    subs = spec.submodules
    if norm is not None and hasattr(subs, "layer_specs") and getattr(subs, "layer_norm", None) is not None:
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(
            subs, layer_norm=fused_norm(norm, sequence_parallel_mark=True)))
    return spec


_rope_tables_last: list = []  # [(freqs, its version, dtype, cos, sin)]: the tables of the forward in progress


def rope_tables(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of megatron's RoPE angles rounded to ``dtype`` (as its
    ``apply_rotary_pos_emb`` does). Every layer's q and k get the same angle tensor within a
    forward, so the tables are computed once for it rather than twice per layer (four kernel
    launches each time, on a path where the host is what limits small steps)."""
    if freqs.requires_grad:
        return freqs.cos().to(dtype), freqs.sin().to(dtype)
    if _rope_tables_last:
        last, version, last_dtype, cos, sin = _rope_tables_last[0]
        if last is freqs and version == freqs._version and last_dtype == dtype:
            return cos, sin
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    _rope_tables_last[:] = [(freqs, freqs._version, dtype, cos, sin)]
    return cos, sin


def fused_rope_apply(rope, original):
    """A replacement for megatron's ``apply_rotary_pos_emb`` that calls ``rope(t, cos, sin)`` for
    the plain case (rotate-half, [s, 1, 1, d] angles shared by the batch or [s, b, 1, d] per
    sample, no packed THD, no mscale) and ``original`` otherwise. cos/sin are rounded to ``t``'s
    dtype as megatron does."""

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None,
                             mla_rotary_interleaved=False, **kwargs):
        plain = (
            rope is not None and cu_seqlens is None and not kwargs and mscale == 1.0
            and not config.apply_rope_fusion and not config.rotary_interleaved
            and not mla_rotary_interleaved and not getattr(config, "multi_latent_attention", False)
            and t.dim() == 4 and freqs.dim() == 4
            and freqs.shape[1] in (1, t.shape[1]) and freqs.shape[2] == 1 and freqs.shape[0] == t.shape[0]
        )
        if not plain:
            return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group,
                            mla_rotary_interleaved=mla_rotary_interleaved, **kwargs)
        return rope(t, *rope_tables(freqs, t.dtype))

    apply_rotary_pos_emb.loongforge_fused = True
    return apply_rotary_pos_emb


@contextlib.contextmanager
def rope_patch(get_rope):
    """While active, megatron's attention applies RoPE through ``get_rope()`` (read per call, so
    kernels configured later still count; ``None``: megatron's own)."""
    from megatron.core.transformer import attention as mattn

    original = mattn.apply_rotary_pos_emb
    if getattr(original, "loongforge_fused", False):  # nested activation: already patched
        yield
        return

    def dispatch(t, freqs, config, *args, **kwargs):
        rope = get_rope()
        if rope is None:
            return original(t, freqs, config, *args, **kwargs)
        return fused_rope_apply(rope, original)(t, freqs, config, *args, **kwargs)

    dispatch.loongforge_fused = True
    mattn.apply_rotary_pos_emb = dispatch
    try:
        yield
    finally:
        mattn.apply_rotary_pos_emb = original


def fused_ce_output_processor(ce, chunk_size: int | None = None):
    """A ``GPTModel.forward(output_processor=...)`` computing the per-token loss ``[b, s]`` with
    ``ce(hidden, weight, labels, reduction="none", chunk_size=...)`` (tp=1, no MuP, labels given);
    anything else goes through megatron's output layer and loss (``chunk_size`` None: the kernel's
    default). With :mod:`loongforge_cuda.embedding_grad`'s fusion on for the weight, its gradient
    goes straight into DDP's ``main_grad``."""
    from loongforge_cuda.embedding_grad import lm_head_weight_and_grad_into

    def processor(*, hidden_states, output_layer, output_weight, labels, runtime_gather_output=None,
                  compute_language_model_loss, scale_logits, config, vocab_size=None, **_):
        fusable = (labels is not None and config.tensor_model_parallel_size == 1
                   and not config.sequence_parallel and not getattr(config, "use_mup", False)
                   and getattr(output_layer, "bias", None) is None)
        if not fusable:
            logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
            logits = scale_logits(logits)
            if labels is None:
                return logits.transpose(0, 1).contiguous()
            return compute_language_model_loss(labels, logits)
        weight = output_weight if output_weight is not None else output_layer.weight
        # the first vocab_size rows; with DDP and the fusion on, the gradient goes into main_grad
        weight, into = lm_head_weight_and_grad_into(weight, vocab_size)
        loss = ce(hidden_states, weight, labels.t(), reduction="none", chunk_size=chunk_size, **into)  # [s, b]
        return loss.t()

    return processor
