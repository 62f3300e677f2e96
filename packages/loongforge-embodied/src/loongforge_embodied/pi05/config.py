"""Configuration of the Pi0 / Pi0.5 policy (one dataclass; ``mode`` picks the variant).

Sizes follow openpi's names: the VLM is PaliGemma (SigLIP + Gemma-2B), the action expert a
Gemma-300M-style decoder that shares attention with the VLM layer by layer, so both stacks need
the same depth, head count, key/value head count and head size (their widths differ).

``mode``:
* ``pi0``: the suffix is [state token, action tokens]; the flow-matching time is concatenated to
  each action token and mixed by an MLP (``action_time_mlp_in/out``).
* ``pi05``: no state token (the state is in the prompt as 256-bin text tokens, see
  :mod:`loongforge_embodied.pi05.state_tokens`); the time goes through ``time_mlp_in/out`` and
  conditions every expert RMSNorm (adaRMS: scale, shift and a residual gate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loongforge.config import ConfigError


@dataclass(frozen=True)
class GemmaSize:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionSize:
    hidden_size: int = 1152
    depth: int = 27
    intermediate_size: int = 4304
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6


GEMMA_2B = GemmaSize(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaSize(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)


@dataclass(frozen=True)
class PiConfig:
    mode: str = "pi05"                      # "pi0" | "pi05"
    vision: VisionSize = field(default_factory=VisionSize)
    vlm: GemmaSize = GEMMA_2B
    expert: GemmaSize = GEMMA_300M
    vocab_size: int = 257152
    chunk_size: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    min_period: float = 4e-3
    max_period: float = 4.0
    #: dtype of the sine/cosine time features: openpi/lerobot compute them in float64,
    #: transformers' PI0 in float32 (the arguments reach ~1500, so the two differ at ~1e-4)
    time_features_fp64: bool = True

    def __post_init__(self):
        if self.mode not in ("pi0", "pi05"):
            raise ConfigError(f"config key 'vla.model.mode': expected 'pi0' or 'pi05', got {self.mode!r}")
        v, e = self.vlm, self.expert
        for k in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(v, k) != getattr(e, k):
                raise ConfigError(f"config key 'vla.model.expert.{k}' ({getattr(e, k)}) must equal "
                                  f"vla.model.vlm.{k} ({getattr(v, k)}): the two stacks share attention")
        if v.num_heads % v.num_kv_heads:
            raise ConfigError("config key 'vla.model.vlm.num_kv_heads' must divide num_heads")
        if e.width % 2:
            raise ConfigError("config key 'vla.model.expert.width' must be even (sine/cosine time features)")

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict, where: str = "vla.model") -> PiConfig:
        """Build from a plain dict (a config section); unknown keys fail naming ``where.key``."""
        import dataclasses

        d = dict(d)
        sub = {"vision": VisionSize, "vlm": GemmaSize, "expert": GemmaSize}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}")
        for k, typ in sub.items():
            if k in d and isinstance(d[k], dict):
                fields = {f.name for f in dataclasses.fields(typ)}
                bad = sorted(set(d[k]) - fields)
                if bad:
                    raise ConfigError(f"unknown config key(s) {', '.join(f'{where}.{k}.{b}' for b in bad)}")
                try:
                    d[k] = typ(**d[k])
                except TypeError as exc:
                    raise ConfigError(f"config section '{where}.{k}': {exc}") from exc
        return cls(**d)


def tiny_config(mode: str = "pi05", **overrides) -> PiConfig:
    """The tiny sizes of transformers' own PI0 test (vision 16 wide, 1 layer, 8 px images of 4 px
    patches; Gemma 16 wide, 2 layers, head_dim 8; chunk 4, state/action 8), with 8 query heads:
    lerobot's pi05 layer code hard-codes 8 heads when it reshapes the attention output."""
    base = dict(
        mode=mode,
        vision=VisionSize(hidden_size=16, depth=1, intermediate_size=32, num_heads=2, image_size=8, patch_size=4),
        vlm=GemmaSize(width=16, depth=2, mlp_dim=32, num_heads=8, num_kv_heads=1, head_dim=8),
        expert=GemmaSize(width=16, depth=2, mlp_dim=32, num_heads=8, num_kv_heads=1, head_dim=8),
        vocab_size=128, chunk_size=4, max_state_dim=8, max_action_dim=8,
    )
    base.update(overrides)
    return PiConfig(**base)
