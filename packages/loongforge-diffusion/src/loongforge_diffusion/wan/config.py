"""The Wan DiT's architecture as a declarative record (no torch import).

Field names and defaults are those of diffusers' ``WanTransformer3DModel`` config, so a diffusers
``config.json`` is read with :meth:`WanConfig.from_diffusers` and written back with
:meth:`WanConfig.to_diffusers`. Fields diffusers' model class does not have (``expand_timesteps``,
``boundary_ratio``) belong to the Wan pipeline and say how the DiT is *driven*; they are kept here
so one record describes a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from loongforge.config import ConfigError

DIFFUSERS_CLASS = "WanTransformer3DModel"

#: diffusers config fields of WanTransformer3DModel (the rest of WanConfig is pipeline-level)
DIFFUSERS_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
    "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
)


@dataclass(frozen=True)
class WanConfig:
    """One Wan DiT (Wan2.1 / Wan2.2; T2V, I2V, TI2V)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # --- pipeline-level -------------------------------------------------------------------------
    expand_timesteps: bool = False       # Wan2.2 TI2V: one timestep per latent token
    boundary_ratio: float | None = None  # Wan2.2 A14B: high-noise expert for t >= boundary_ratio * 1000
    text_len: int = 512                  # umT5 context length the DiT sees
    vae_scale_factor_temporal: int = 4
    vae_scale_factor_spatial: int = 8
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        self.validate()

    # --- derived ---------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim channels rotated by the frame, row and column position (diffusers' split)."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def validate(self) -> None:
        def bad(key: str, why: str):
            raise ConfigError(f"config key 'model.{key}': {why}")

        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            bad("patch_size", f"expected three positive ints (t, h, w), got {self.patch_size}")
        for key in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                    "num_layers"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.attention_head_dim % 2 or any(d % 2 for d in self.rope_dims):
            bad("attention_head_dim", f"{self.attention_head_dim} does not split into even t/h/w RoPE parts")
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            bad("qk_norm", f"only 'rms_norm_across_heads' or null are implemented, got {self.qk_norm!r}")
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            bad("boundary_ratio", f"must be in (0, 1), got {self.boundary_ratio}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            bad("image_dim", "image_dim and added_kv_proj_dim are set together (Wan2.1 I2V image branch)")

    # --- diffusers <-> ours ----------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **pipeline: Any) -> WanConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in DIFFUSERS_FIELDS}
        extra = {k: v for k, v in config.items() if k not in known and not k.startswith("_")}
        kwargs.update(pipeline)
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        return cls(**kwargs, extra=extra)

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS}
        for k in DIFFUSERS_FIELDS:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_section(cls, section: Any) -> WanConfig:
        """From the ``model`` config section (an OmegaConf node or dict); ``family`` and
        ``pretrained`` are not architecture and are skipped. Unknown keys fail by name."""
        try:
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
        except ImportError:  # pragma: no cover
            data = dict(section)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        data = {k: v for k, v in data.items() if k not in ("family", "pretrained", "name")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config key 'model.{unknown[0]}': not a Wan model field (known: {sorted(known)})")
        return cls(**data)

    def transformer_config(self, **overrides: Any):
        """The megatron-core ``TransformerConfig`` the trainer's DDP/optimizer read (fp32 unless overridden)."""
        from megatron.core.transformer import TransformerConfig

        kw = dict(num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                  kv_channels=self.attention_head_dim, ffn_hidden_size=self.ffn_dim, hidden_dropout=0.0,
                  attention_dropout=0.0, layernorm_epsilon=self.eps, add_bias_linear=True, use_cpu_initialization=True)
        kw.update(overrides)
        return TransformerConfig(**kw)
