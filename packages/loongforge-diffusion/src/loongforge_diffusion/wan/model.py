"""The Wan DiT (Wan2.1 / Wan2.2 ``WanTransformer3DModel``) as a megatron-core module.

Layout: activations are batch-first ``[B, S, hidden]``; the video latent ``[B, C, F, H, W]`` is cut
into ``patch_size`` patches (tokens frame-major), embedded, run through ``num_layers`` blocks and
projected back. Per block:

    shift, scale, gate, c_shift, c_scale, c_gate = block.modulation + time_proj(t)   (fp32)
    x = x + gate * self_attn(LN(x) * (1 + scale) + shift)        3D RoPE on q/k
    x = x + cross_attn(LN_affine(x), text [, image])             no RoPE, no gate
    x = x + c_gate * mlp(LN(x) * (1 + c_scale) + c_shift)        GELU (tanh)

q and k are RMS-normalised across all heads (``qk_norm="rms_norm_across_heads"``). The timestep is
one per sample (``[B]``) or one per token (``[B, S]``, Wan2.2 TI2V's ``expand_timesteps``).

Tensor parallelism: the self-attention's fused ``linear_qkv`` (megatron-core's layout, per head
``[q_h; k_h; v_h]``), the cross-attention's ``linear_q`` and fused ``linear_kv`` (``[k_r; v_r]`` per
rank) and the MLP's first linear are megatron-core ``ColumnParallelLinear`` (heads / FFN channels
split over TP ranks), the attention output and second MLP linear
``RowParallelLinear``; the q/k RMSNorm across heads all-reduces its sum of squares over TP. The
embeddings, modulation tables and output head are replicated. Context parallelism over video
tokens (Ulysses or all-gather) is in :mod:`loongforge_diffusion.wan.context_parallel`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.rope import apply_rope, grid_positions, rope_cos_sin


def _tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[..., dim]`` of (fractional) timesteps: ``[cos | sin]`` (flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class HeadsRMSNorm(torch.nn.Module):
    """RMSNorm over all heads' channels of q or k; with TP each rank holds ``dim / tp`` of them."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, tp_group=None):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.weight = torch.nn.Parameter(torch.ones(local_dim))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)  # split over TP like the heads
        self.full_dim, self.eps, self.tp_group = full_dim, eps, tp_group

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sq = xf.pow(2).sum(-1, keepdim=True)
        if self.tp_group is not None and self.tp_group.size() > 1:
            from torch.distributed.nn.functional import all_reduce

            sq = all_reduce(sq, group=self.tp_group)
        return (xf * torch.rsqrt(sq / self.full_dim + self.eps) * self.weight.float()).to(x.dtype)


class Attention(MegatronModule):
    """Self-attention (3D RoPE) or cross-attention to the text (and, for Wan2.1 I2V, image) context."""

    def __init__(self, config, wan: WanConfig, *, cross: bool, tp_group=None, image_branch: bool = False):
        super().__init__(config)
        self.cross = cross
        dim, tp_group = wan.hidden_size, _tp_group(tp_group)
        tp = tp_group.size()
        if wan.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {wan.num_attention_heads} is not divisible by TP size {tp}")
        self.local_heads, self.head_dim = wan.num_attention_heads // tp, wan.attention_head_dim
        init = config.init_method

        def col(name, out_dim, in_dim=dim):
            setattr(self, name, tensor_parallel.ColumnParallelLinear(
                in_dim, out_dim, config=config, init_method=init, bias=True, gather_output=False, tp_group=tp_group))

        if cross:  # q from the video tokens; k and v from the context, fused as [k_r; v_r] per TP rank
            col("linear_q", dim)
            col("linear_kv", 2 * dim)
        else:  # fused q/k/v, per head [q_h; k_h; v_h] (megatron-core's linear_qkv layout with groups = heads)
            col("linear_qkv", 3 * dim)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            dim, dim, config=config, init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
            skip_bias_add=False, tp_group=tp_group)
        local = self.local_heads * self.head_dim
        qk = wan.qk_norm is not None
        self.norm_q = HeadsRMSNorm(local, dim, wan.eps, tp_group) if qk else None
        self.norm_k = HeadsRMSNorm(local, dim, wan.eps, tp_group) if qk else None
        self.image_branch = image_branch
        if image_branch:
            col("linear_kv_img", 2 * dim, wan.added_kv_proj_dim)  # the embedded image features
            self.norm_k_img = HeadsRMSNorm(local, dim, wan.eps, tp_group) if qk else None
        #: context-parallel group and mode (set by ``context_parallel.enable``); None: off
        self.cp_group, self.cp_mode = None, "ulysses"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.local_heads, self.head_dim))

    def _attend(self, q, k, v, mask):
        """SDPA over ``[B, S, H, D]`` tensors; ``mask`` bool ``[B, 1, Sq, Sk]`` (True = may attend)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    def forward(self, x, context=None, rope=None, mask=None, context_image=None):
        if self.cross:
            q = self.linear_q(x)[0]
            k, v = self.linear_kv(context)[0].chunk(2, dim=-1)
        else:
            q, k, v = self.linear_qkv(x)[0].unflatten(-1, (self.local_heads, 3, self.head_dim)).unbind(-2)
            q, k, v = q.flatten(-2), k.flatten(-2), v.flatten(-2)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.cp_group is not None and not self.cross:
            from loongforge_diffusion.wan import context_parallel as cp

            fn = cp.ulysses_attention if self.cp_mode == "ulysses" else cp.all_gather_attention
            out = fn(self._attend, q, k, v, mask, self.cp_group)
        else:
            out = self._attend(q, k, v, mask)
        if self.image_branch and context_image is not None:
            ki, vi = self.linear_kv_img(context_image)[0].chunk(2, dim=-1)
            if self.norm_k_img is not None:
                ki = self.norm_k_img(ki)
            out = out + self._attend(q, self._heads(ki), self._heads(vi), None)
        return self.linear_proj(out.flatten(-2))[0]


class MLP(MegatronModule):
    def __init__(self, config, wan: WanConfig, tp_group=None):
        super().__init__(config)
        tp_group = _tp_group(tp_group)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            wan.hidden_size, wan.ffn_dim, config=config, init_method=config.init_method, bias=True,
            gather_output=False, tp_group=tp_group)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            wan.ffn_dim, wan.hidden_size, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x)[0], approximate="tanh"))[0]


def _layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm in fp32 (diffusers' FP32LayerNorm), result in fp32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class WanBlock(MegatronModule):
    def __init__(self, config, wan: WanConfig, tp_group=None):
        super().__init__(config)
        self.eps = wan.eps
        self.self_attn = Attention(config, wan, cross=False, tp_group=tp_group)
        self.cross_attn = Attention(config, wan, cross=True, tp_group=tp_group,
                                    image_branch=wan.added_kv_proj_dim is not None)
        self.cross_attn_norm = torch.nn.LayerNorm(wan.hidden_size, eps=wan.eps) if wan.cross_attn_norm else None
        self.mlp = MLP(config, wan, tp_group)
        self.modulation = torch.nn.Parameter(torch.randn(1, 6, wan.hidden_size) / wan.hidden_size ** 0.5)

    def forward(self, x, t_proj, context, rope, self_mask=None, cross_mask=None, context_image=None):
        # t_proj: [B, 1 or S, 6, hidden] (fp32)
        mod = (self.modulation.unsqueeze(0) + t_proj.float()).unbind(2)
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        h = (_layer_norm(x, self.eps) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.self_attn(h, rope=rope, mask=self_mask) * gate).type_as(x)
        if self.cross_attn_norm is not None:
            h = _layer_norm(x, self.eps, self.cross_attn_norm.weight, self.cross_attn_norm.bias).type_as(x)
        else:
            h = x
        x = x + self.cross_attn(h, context=context, mask=cross_mask, context_image=context_image)
        h = (_layer_norm(x, self.eps) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.mlp(h).float() * c_gate).type_as(x)


class ImageEmbedder(torch.nn.Module):
    """Wan2.1 I2V: CLIP image features -> hidden (LayerNorm, MLP with exact GELU, LayerNorm)."""

    def __init__(self, wan: WanConfig):
        super().__init__()
        d = wan.image_dim
        self.norm_in = torch.nn.LayerNorm(d, eps=1e-5)
        self.linear_1 = torch.nn.Linear(d, d)
        self.linear_2 = torch.nn.Linear(d, wan.hidden_size)
        self.norm_out = torch.nn.LayerNorm(wan.hidden_size, eps=1e-5)
        self.pos_embed = (torch.nn.Parameter(torch.zeros(1, wan.pos_embed_seq_len, d))
                          if wan.pos_embed_seq_len is not None else None)

    def forward(self, x):
        if self.pos_embed is not None:
            x = x.view(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        x = _layer_norm(x, 1e-5, self.norm_in.weight, self.norm_in.bias).to(x.dtype)
        x = self.linear_2(F.gelu(self.linear_1(x)))
        return _layer_norm(x, 1e-5, self.norm_out.weight, self.norm_out.bias).to(x.dtype)


class WanDiT(MegatronModule):
    """The Wan DiT. ``forward`` takes a latent video; ``forward_tokens`` takes patch tokens with
    explicit positions and attention masks (packing, context parallelism)."""

    def __init__(self, wan: WanConfig, config=None, *, tp_group=None):
        super().__init__(config if config is not None else wan.transformer_config())
        self.wan = wan
        dim, patch = wan.hidden_size, wan.patch_size
        self.patch_embedding = torch.nn.Conv3d(wan.in_channels, dim, kernel_size=patch, stride=patch)
        self.time_embedder = torch.nn.ModuleDict(
            {"linear_1": torch.nn.Linear(wan.freq_dim, dim), "linear_2": torch.nn.Linear(dim, dim)})
        self.time_proj = torch.nn.Linear(dim, 6 * dim)
        self.text_embedder = torch.nn.ModuleDict(
            {"linear_1": torch.nn.Linear(wan.text_dim, dim), "linear_2": torch.nn.Linear(dim, dim)})
        self.image_embedder = ImageEmbedder(wan) if wan.image_dim is not None else None
        self.blocks = torch.nn.ModuleList([WanBlock(self.config, wan, tp_group) for _ in range(wan.num_layers)])
        self.proj_out = torch.nn.Linear(dim, wan.out_channels * wan.patch_volume)
        self.head_modulation = torch.nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        #: activation recompute of each block in backward (config key ``diffusion.recompute``)
        self.recompute = False

    def set_input_tensor(self, tensor) -> None:
        """megatron-core's schedules call this (through Float16Module too); no pipeline stages here."""

    # --- patches -----------------------------------------------------------------------------------
    def grid(self, latent_shape) -> tuple[int, int, int]:
        """Patch grid ``(f, h, w)`` of a latent ``[..., F, H, W]``; raises if not divisible by the patch."""
        sizes = tuple(latent_shape[-3:])
        for axis, (n, p) in enumerate(zip(sizes, self.wan.patch_size, strict=True)):
            if n % p:
                raise ValueError(f"latent {('frames', 'height', 'width')[axis]} {n} is not divisible by the patch "
                                 f"size {p} (config key 'model.patch_size' = {list(self.wan.patch_size)})")
        return tuple(n // p for n, p in zip(sizes, self.wan.patch_size, strict=True))

    def patchify(self, latents: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, f*h*w, C*pt*ph*pw]`` (tokens frame-major). Within a patch
        the input embedding reads channels first; ``channels_last`` gives the output layout
        (``pt*ph*pw*C``, what :meth:`unpatchify` takes), e.g. for a loss on tokens."""
        (f, h, w), (pt, ph, pw) = self.grid(latents.shape), self.wan.patch_size
        b, c = latents.shape[:2]
        x = latents.reshape(b, c, f, pt, h, ph, w, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1) if channels_last else x.permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, f * h * w, c * pt * ph * pw)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, f*h*w, pt*ph*pw*C]`` (channels last within a patch) -> ``[B, C, F, H, W]``."""
        (f, h, w), (pt, ph, pw) = grid, self.wan.patch_size
        b = tokens.shape[0]
        x = tokens.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f * pt, h * ph, w * pw)

    # --- conditioning ------------------------------------------------------------------------------
    def embed_time(self, timestep: torch.Tensor):
        """``(temb [B, n, hidden], t_proj [B, n, 6, hidden])``, n = 1 (per sample) or S (per token)."""
        t = timestep if timestep.ndim == 2 else timestep[:, None]
        feats = timestep_features(t, self.wan.freq_dim).to(self.time_embedder["linear_1"].weight.dtype)
        temb = self.time_embedder["linear_2"](F.silu(self.time_embedder["linear_1"](feats)))
        t_proj = self.time_proj(F.silu(temb))
        return temb, t_proj.unflatten(-1, (6, -1))

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        return self.text_embedder["linear_2"](F.gelu(self.text_embedder["linear_1"](context), approximate="tanh"))

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, latents, timestep, context, context_image=None, *, positions=None, self_mask=None,
                cross_mask=None):
        """Velocity prediction ``[B, C_out, F, H, W]`` for noisy ``latents`` ``[B, C_in, F, H, W]``,
        ``timestep`` ``[B]`` or ``[B, f*h*w]`` (0..1000) and text embeddings ``context`` ``[B, L, text_dim]``.

        With ``positions`` given, ``latents`` are patch tokens and this is :meth:`forward_tokens`
        (the trainer's path: packing and context parallelism live on tokens).
        """
        if positions is not None:
            return self.forward_tokens(latents, positions, timestep, context, self_mask=self_mask,
                                       cross_mask=cross_mask, context_image=context_image)
        grid = self.grid(latents.shape)
        positions = grid_positions(*grid, device=latents.device).expand(latents.shape[0], -1, -1)
        out = self.forward_tokens(self.patchify(latents), positions, timestep, context, context_image=context_image)
        return self.unpatchify(out, grid)

    def forward_tokens(self, tokens, positions, timestep, context, *, self_mask=None, cross_mask=None,
                       context_image=None):
        """Output patch tokens ``[B, S, C_out*patch]`` for input patch tokens ``[B, S, C_in*patch]``.

        ``positions`` ``[B, S, 3]``: each token's (frame, row, column) patch index (RoPE);
        ``timestep`` ``[B]`` or ``[B, S]``; ``self_mask`` ``[B, 1, S, S]`` / ``cross_mask``
        ``[B, 1, S, L]`` bool, True where a token may attend (packed clips), ``None`` = all.
        """
        weight = self.patch_embedding.weight
        x = F.linear(tokens.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)
        temb, t_proj = self.embed_time(timestep)
        context = self.embed_text(context.to(weight.dtype))
        if context_image is not None:
            context_image = self.image_embedder(context_image.to(weight.dtype))
        rope = rope_cos_sin(positions, self.wan.rope_dims)
        for block in self.blocks:
            args = (x, t_proj, context, rope, self_mask, cross_mask, context_image)
            if self.recompute and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        shift, scale = (self.head_modulation.unsqueeze(0) + temb.unsqueeze(2).float()).unbind(2)
        x = (_layer_norm(x, self.wan.eps) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)
