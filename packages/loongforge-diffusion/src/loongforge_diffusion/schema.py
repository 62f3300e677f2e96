"""The ``diffusion`` config section (registered as a ``ConfigSection``; unknown keys fail by name)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DiffusionConfig:
    # --- data --------------------------------------------------------------------------------------
    manifests: list[str] = field(default_factory=list)  # jsonl/parquet video+caption manifests
    synthetic_clips: int = 0          # >0 and no manifests: write this many moving-shapes clips first
    latents: str | None = None        # preprocessed folder; None: <output_dir>/latents (made if missing)
    num_frames: int = 9               # decoded frames per clip (1 + k * VAE temporal factor)
    frame_stride: int = 1
    buckets: list[list[int]] = field(default_factory=lambda: [[64, 64]])  # [height, width] choices
    video_field: str = "video"
    caption_field: str = "caption"
    shard_size: int = 64
    vae: str = "tiny"                 # diffusers AutoencoderKLWan folder, or tiny (random, from config)
    text_encoder: str = "tiny"        # transformers UMT5EncoderModel folder, or tiny (random, from config)
    encoder_seed: int = 0
    # --- objective (loongforge_diffusion.flow) ------------------------------------------------------
    shift: float = 5.0
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"      # none | bell
    cfg_dropout: float = 0.1
    first_frame_prob: float = 0.0     # TI2V: keep the first latent frame clean (image condition)
    expert: str = "both"              # A14B: high | low | both (two DiTs in one run)
    # --- model execution ---------------------------------------------------------------------------
    packing: bool = False             # pack a micro-batch's clips into one sequence (per-clip masks)
    cp_mode: str = "ulysses"          # parallel.cp > 1: ulysses (all-to-all over heads) | all_gather (K/V)
    recompute: bool = False           # recompute each block's activations in backward
    ema_decay: float = 0.0            # >0: keep an EMA of the weights (saved as ema.safetensors)
    # --- sampling (end of run, generate) -------------------------------------------------------------
    sample_at_end: bool = True
    sample_prompt: str = "a red square moving right on a blue background"
    sample_steps: int = 8
    sample_guidance: float = 3.0
    sample_solver: str = "euler"      # euler | unipc
    sample_format: str = "gif"        # gif | mp4
