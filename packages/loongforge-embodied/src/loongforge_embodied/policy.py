"""The trainable VLA policy module: image preprocessing + the Pi0/Pi0.5 network + the
flow-matching loss, as one ``MegatronModule`` (megatron-core's DDP and optimizer read its
``.config``), plus observation -> action-chunk inference.

Batches (built by :func:`collate` from :class:`~loongforge_embodied.data.lerobot_v3.LeRobotV3Dataset`
samples): ``images`` uint8 [B, ncam, 3, H, W], ``image_masks`` [B, ncam], ``tokens`` /
``token_masks`` [B, L], ``state`` [B, max_state_dim], ``actions`` [B, chunk, max_action_dim],
``action_valid`` [B, chunk], ``noise`` like ``actions``, ``time`` [B]. State/action vectors are
zero-padded to the model's ``max_*_dim`` (openpi's ``pad_vector``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from loongforge_embodied.flow_matching import FlowMatching
from loongforge_embodied.pi05.config import PiConfig
from loongforge_embodied.pi05.model import PiModel


def transformer_config(pc: PiConfig, bf16: bool = False):
    """The megatron-core config the trainer's DDP/optimizer read (sizes of the VLM backbone)."""
    from megatron.core.transformer import TransformerConfig

    v = pc.vlm
    return TransformerConfig(num_layers=v.depth, hidden_size=v.width, num_attention_heads=v.num_heads,
                             num_query_groups=v.num_kv_heads, kv_channels=v.head_dim, ffn_hidden_size=v.mlp_dim,
                             bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             pipeline_dtype=torch.bfloat16 if bf16 else torch.float32)


def train_flops_per_sample(pc: PiConfig, cameras: int, text_tokens: int) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 x forward): 6 x weights x tokens
    each stack processes (SigLIP: the image patches; VLM: the prefix; expert: the suffix) plus the
    attention products (QK^T and AV: 4 x heads x head_dim x T^2 per layer forward, T = prefix +
    suffix, full matrix). Embedding lookups and the norms are not counted."""
    prefix = cameras * pc.num_image_tokens + text_tokens
    suffix = pc.chunk_size + (pc.mode == "pi0")
    v, g, e = pc.vision, pc.vlm, pc.expert
    vis = v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + v.hidden_size * g.width

    def layer(s):
        return s.width * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads) + 3 * s.width * s.mlp_dim

    linear = vis * pc.num_image_tokens * cameras + g.depth * layer(g) * prefix + e.depth * layer(e) * suffix
    total = prefix + suffix
    attn = g.depth * 4 * g.num_heads * g.head_dim * total * total
    return 6.0 * linear + 3.0 * attn


def preprocess_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, ncam, 3, H, W] -> float [-1, 1] at ``size`` x ``size`` (bilinear; square inputs
    assumed, as lerobot's ``resize_with_pad`` pads non-square ones first)."""
    b, n = images.shape[:2]
    x = images.flatten(0, 1).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).view(b, n, 3, size, size)


class VLAPolicy(MegatronModule):
    def __init__(self, pc: PiConfig, config, action_dim: int, flow: FlowMatching | None = None):
        super().__init__(config=config)
        self.pc, self.action_dim = pc, action_dim
        self.flow = flow or FlowMatching()
        self.net = PiModel(pc)

    def set_input_tensor(self, input_tensor) -> None:
        """No pipeline stages: the whole policy is one chunk (megatron's schedule calls this)."""

    def forward(self, images, image_masks, tokens, token_masks, state, actions, action_valid, noise, time):
        """Per-sample flow-matching loss [B] (fp32)."""
        pixels = preprocess_images(images, self.pc.vision.image_size).to(self.net.projector.weight.dtype)
        x_t, u = self.flow.interpolate(actions, noise, time)
        v = self.net(pixels, image_masks, tokens, token_masks, x_t, time,
                     state=state if self.pc.mode == "pi0" else None)
        err = (v.float() - u.float())[..., :self.action_dim].pow(2).mean(-1)
        w = action_valid.to(err.dtype)
        return (err * w).sum(1) / w.sum(1).clamp(min=1)

    @torch.no_grad()
    def sample(self, images, image_masks, tokens, token_masks, state=None, noise=None, steps: int = 10,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunk [B, chunk, action_dim] (normalised units) by ``steps`` Euler steps from
        ``noise`` (drawn from ``generator`` when not given), the prefix run once."""
        pc = self.pc
        pixels = preprocess_images(images, pc.vision.image_size).to(self.net.projector.weight.dtype)
        if noise is None:
            noise = torch.randn(images.shape[0], pc.chunk_size, pc.max_action_dim, generator=generator)
        noise = noise.to(pixels.device)
        cache, ppad = self.net.prefix_cache(pixels, image_masks, tokens, token_masks)
        st = state if pc.mode == "pi0" else None
        x = self.flow.euler(lambda x, t: self.net.velocity_cached(cache, ppad, x, t, state=st), noise, steps)
        return x[..., :self.action_dim]
