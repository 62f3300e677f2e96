"""``wan_pretrain``: flow-matching training of a Wan DiT on preprocessed video latents.

The core's trainer keeps the loop, optimizer, checkpoints and metrics; this task supplies the
model, the data and the loss (``loongforge.task.TrainTask``). Order of work:

1. ``resolve_config`` (before any process starts): the ``model`` section must be a valid
   :class:`WanConfig`; frames, buckets, expert choice, parallel layout are checked against it.
2. ``build_datasets``: the main rank writes the synthetic set (``diffusion.synthetic_clips``) and
   runs the frozen VAE + text encoder once over the manifests into ``diffusion.latents``
   (skipped when it exists); every rank then reads latents only. Each sample index is unique over
   the run (the latent set repeated), and its noise/timestep/CFG draw is seeded by that index, so
   the loss does not depend on how samples are spread over DP ranks or micro-batches.
3. ``build_model``: one WanDiT (or, for Wan2.2 A14B with ``diffusion.expert: both``, the high- and
   low-noise experts in one chunk, each sample routed by its timestep), pretrained diffusers
   weights (``model.pretrained``), LoRA (``peft.lora``), recompute, Ulysses CP, bf16 wrapping.
4. ``forward_step``: tokens (stacked or packed, CP-split) -> velocity -> summed weighted MSE over
   samples (``unit = "samples"``); after each optimizer step the EMA (``diffusion.ema_decay``).
5. ``summarize``: a short sample video (gif/mp4) from the trained model.

MFU: :meth:`flops_per_unit` (the formula: :func:`loongforge_diffusion.wan.flops.wan_flops_per_sample`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from loongforge.config import ConfigError
from loongforge.task import TrainTask

from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.flops import latent_grid, wan_flops_per_sample


class EpochSamples(torch.utils.data.Dataset):
    """``base`` repeated to ``total`` items; item ``i`` is ``base[i % len(base)]`` with seed ``i``."""

    def __init__(self, base, total: int, seed: int):
        self.base, self.total, self.seed = base, max(int(total), len(base)), int(seed)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i % len(self.base)], "seed": self.seed * 1_000_003 + i}


def _experts_class():
    from megatron.core.transformer.module import MegatronModule

    class WanExperts(MegatronModule):
        """Wan2.2 A14B: two DiTs of one architecture; rows with ``t >= boundary`` go to ``high``."""

        def __init__(self, high, low, boundary_ratio: float):
            super().__init__(high.config)
            self.high, self.low, self.boundary, self.wan = high, low, boundary_ratio * 1000, high.wan

        forward = _experts_forward

        def set_input_tensor(self, tensor) -> None:
            """No pipeline stages (megatron-core's schedules call it)."""

    return WanExperts


def _experts_forward(self, tokens, timestep, context, context_image=None, **kw):
    """Each row through the expert of its noise level (packing is refused for two experts)."""
    t_row = timestep if timestep.ndim == 1 else timestep.amax(dim=1)
    is_high = t_row >= self.boundary
    out = None
    for expert, rows in ((self.high, is_high), (self.low, ~is_high)):
        idx = rows.nonzero().flatten()
        if idx.numel() == 0:
            continue
        part = expert(tokens[idx], timestep[idx], context[idx], context_image,
                      **{k: (v[idx] if torch.is_tensor(v) else v) for k, v in kw.items()})
        out = part.new_zeros((tokens.shape[0], *part.shape[1:])) if out is None else out
        out = out.index_copy(0, idx, part)
    return out


class WanTask(TrainTask):
    """Flow-matching pre-training / fine-tuning of a Wan DiT (config key ``task: wan_pretrain``)."""

    unit = "samples"

    # --- before any process group ------------------------------------------------------------------
    @classmethod
    def resolve_config(cls, cfg, plugins):
        from loongforge_diffusion.data.video import check_buckets
        from loongforge_diffusion.flow import FlowMatching

        wan = WanConfig.from_section(cfg.model)
        d, p = cfg.diffusion, cfg.parallel
        vt = wan.vae_scale_factor_temporal
        if d.num_frames < 1 or (d.num_frames - 1) % vt:
            raise ConfigError(f"config key 'diffusion.num_frames' = {d.num_frames}: the VAE needs 1 + a multiple "
                              f"of {vt} frames (model.vae_scale_factor_temporal)")
        if ((d.num_frames - 1) // vt + 1) % wan.patch_size[0]:
            raise ConfigError(f"config key 'diffusion.num_frames': {(d.num_frames - 1) // vt + 1} latent frames are "
                              f"not divisible by the temporal patch {wan.patch_size[0]}")
        check_buckets(d.buckets, wan.vae_scale_factor_spatial * math.lcm(*wan.patch_size[1:]))
        FlowMatching.from_config(d, wan.boundary_ratio)
        for key, allowed in (("timestep_sampling", ("uniform", "logit_normal")), ("loss_weighting", ("none", "bell")),
                             ("expert", ("both", "high", "low")), ("sample_solver", ("euler", "unipc")),
                             ("sample_format", ("gif", "mp4")), ("cp_mode", ("ulysses", "all_gather"))):
            if d[key] not in allowed:
                raise ConfigError(f"config key 'diffusion.{key}' = {d[key]!r}: one of {', '.join(allowed)}")
        if d.expert == "both" and wan.boundary_ratio is not None and d.packing:
            raise ConfigError("config key 'diffusion.packing': the two A14B experts route whole samples; "
                              "train one expert (diffusion.expert=high|low) to pack")
        if p.pp != 1 or p.vpp:
            raise ConfigError("config key 'parallel.pp': the Wan DiT trains without pipeline parallelism")
        if p.sequence_parallel:
            raise ConfigError("config key 'parallel.sequence_parallel': not supported by the Wan DiT (use parallel.cp)")
        if d.cp_mode == "ulysses" and wan.num_attention_heads % (p.tp * p.cp):
            raise ConfigError(f"config key 'parallel.cp': {wan.num_attention_heads} heads are not divisible by "
                              f"tp x cp = {p.tp * p.cp} (Ulysses; diffusion.cp_mode=all_gather needs only tp)")
        if not 0.0 <= d.ema_decay < 1.0:
            raise ConfigError(f"config key 'diffusion.ema_decay' = {d.ema_decay}: must be in [0, 1)")
        if d.ema_decay and p.tp > 1:
            raise ConfigError("config key 'diffusion.ema_decay': the EMA is kept for tp = 1 only")
        if not d.manifests and d.synthetic_clips < 1 and not d.latents:
            raise ConfigError("config key 'diffusion.manifests': give video manifests, diffusion.latents or "
                              "diffusion.synthetic_clips")
        return cfg

    def __init__(self, cfg, rt):
        from loongforge_diffusion.flow import FlowMatching

        super().__init__(cfg, rt)
        self.wan = WanConfig.from_section(cfg.model)
        self.flow = FlowMatching.from_config(cfg.diffusion, self.wan.boundary_ratio)
        self.dits: list = []
        self.null_text = None
        self.ema = None

    # --- model -------------------------------------------------------------------------------------
    def _two_experts(self) -> bool:
        return self.wan.boundary_ratio is not None and self.cfg.diffusion.expert == "both"

    def build_model(self) -> list:
        from loongforge.peft.lora import apply_lora_config
        from loongforge.trainer.model import wrap_precision
        from megatron.core import parallel_state

        from loongforge_diffusion.wan import context_parallel
        from loongforge_diffusion.wan.model import WanDiT

        cfg, p = self.cfg, self.cfg.parallel
        bf16 = cfg.train.precision == "bf16"
        config = self.wan.transformer_config(bf16=bf16, tensor_model_parallel_size=p.tp, context_parallel_size=p.cp)
        torch.manual_seed(cfg.seed)  # every rank builds identical (replicated and pre-split) weights
        dits = [WanDiT(self.wan, config) for _ in range(2 if self._two_experts() else 1)]
        pretrained = cfg.model.get("pretrained")
        if pretrained:
            self._load_pretrained(dits, Path(pretrained))
        for dit in dits:
            dit.recompute = bool(cfg.diffusion.recompute) or cfg.train.recompute.granularity == "full"
            if p.cp > 1:
                context_parallel.enable(dit, parallel_state.get_context_parallel_group(), cfg.diffusion.cp_mode)
        model = _experts_class()(*dits, self.wan.boundary_ratio) if len(dits) == 2 else dits[0]
        model = model.to(self.rt.backend.device())
        apply_lora_config([model], cfg)
        self.dits, self.module = dits, model
        return wrap_precision([model], config, bf16)

    def _load_pretrained(self, dits, path: Path) -> None:
        from megatron.core import parallel_state

        from loongforge_diffusion.wan.weights import load_diffusers_into

        tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), self.cfg.parallel.tp
        if len(dits) == 2:
            folders = [path / "transformer", path / "transformer_2"]
        elif self.wan.boundary_ratio is not None and (path / "transformer").is_dir():
            folders = [path / ("transformer" if self.cfg.diffusion.expert == "high" else "transformer_2")]
        else:
            folders = [path / "transformer" if (path / "transformer").is_dir() else path]
        for dit, folder in zip(dits, folders, strict=True):
            load_diffusers_into(dit, folder, tp_rank, tp)

    # --- data --------------------------------------------------------------------------------------
    def latents_folder(self) -> Path:
        d = self.cfg.diffusion
        return Path(d.latents) if d.latents else Path(self.cfg.output_dir) / "latents"

    def prepare_latents(self, folder: Path) -> None:
        from loongforge_diffusion.data.encoders import Encoders
        from loongforge_diffusion.data.latents import preprocess
        from loongforge_diffusion.data.synthetic import write_moving_shapes
        from loongforge_diffusion.data.video import VideoCaptionDataset

        d = self.cfg.diffusion
        manifests = list(d.manifests)
        if not manifests:
            h, w = d.buckets[0]
            manifests = [str(write_moving_shapes(Path(self.cfg.output_dir) / "synthetic", d.synthetic_clips,
                                                 frames=(d.num_frames - 1) * d.frame_stride + 1, height=h, width=w,
                                                 seed=self.cfg.seed))]
        ds = VideoCaptionDataset(manifests, num_frames=d.num_frames, buckets=d.buckets, frame_stride=d.frame_stride,
                                 video_field=d.video_field, caption_field=d.caption_field)
        index = preprocess(ds, Encoders.build(d, self.wan), folder, shard_size=d.shard_size,
                           on_error=self.cfg.data.on_error)
        print(f"preprocessed {index['num_samples']} clips into {folder} ({index['num_skipped']} skipped)")

    def build_datasets(self):
        import torch.distributed as dist

        from loongforge_diffusion.data.latents import INDEX, LatentDataset

        folder = self.latents_folder()
        if self.rt.is_main and not (folder / INDEX).is_file():
            self.prepare_latents(folder)
        if dist.is_initialized():
            dist.barrier()
        base = LatentDataset(folder)
        self.null_text = base.null_text
        total = self.cfg.train.steps * self.cfg.train.global_batch_size
        return EpochSamples(base, total, self.cfg.seed), None

    def collate(self, samples: list) -> dict:
        return {"latent": [s["latent"] for s in samples], "text": [s["text"] for s in samples],
                "seed": [int(s["seed"]) for s in samples]}

    # --- one micro-batch ---------------------------------------------------------------------------
    def model_inputs(self, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor, int]:
        """(model kwargs on the device, target, coef, number of samples in the micro-batch)."""
        from megatron.core import parallel_state

        from loongforge_diffusion.batching import assemble, sample_tokens, split_for_cp

        dit = self.dits[0]
        items = [sample_tokens(dit, self.flow, lat, txt, self.null_text, seed)
                 for lat, txt, seed in zip(batch["latent"], batch["text"], batch["seed"], strict=True)]
        packed = assemble(items, bool(self.cfg.diffusion.packing), self.wan.expand_timesteps)
        cp = self.cfg.parallel.cp
        packed = split_for_cp(packed, parallel_state.get_context_parallel_rank() if cp > 1 else 0, cp)
        dev = self.rt.backend.device()
        # the timestep travels as float64: megatron's Float16Module casts only fp32 inputs to bf16
        kwargs = {"latents": packed["tokens"].to(dev), "timestep": packed["timestep"].to(dev, torch.float64),
                  "context": packed["context"].to(dev), "positions": packed["positions"].to(dev),
                  "self_mask": None if packed["self_mask"] is None else packed["self_mask"].to(dev),
                  "cross_mask": None if packed["cross_mask"] is None else packed["cross_mask"].to(dev)}
        return kwargs, packed["target"].to(dev), packed["coef"].to(dev), len(items)

    def forward_step(self, batch: dict, model):
        from loongforge_diffusion.batching import token_loss_sum

        kwargs, target, coef, count = self.model_inputs(batch)
        output = model(kwargs.pop("latents"), kwargs.pop("timestep"), kwargs.pop("context"), **kwargs)
        # Under CP each rank holds part of every sample's tokens but counts all its samples (the
        # count must be an integer); megatron sums counts and gradients over dp x cp, so the
        # partial loss is scaled by cp: sum over CP ranks = cp x (the samples' loss), / (cp x count).
        cp = self.cfg.parallel.cp

        def loss_fn(out):
            loss_sum = token_loss_sum(out, target, coef) * cp
            n = torch.tensor(count, dtype=torch.int, device=loss_sum.device)
            return loss_sum, n, {"loss_sum": loss_sum.detach().clone(), "tokens": n}

        return output, loss_fn

    # --- metrics, saving, the end ------------------------------------------------------------------
    def units_per_sample(self) -> int:
        return 1

    def flops_per_unit(self) -> float | None:
        d = self.cfg.diffusion
        f, h, w = latent_grid(self.wan, d.num_frames, *d.buckets[0])
        pt, ph, pw = self.wan.patch_size
        return wan_flops_per_sample(self.wan, (f // pt) * (h // ph) * (w // pw), self.wan.text_len)

    def on_train_start(self, trainer) -> None:
        from loongforge_diffusion.ema import EMA

        if self.cfg.diffusion.ema_decay > 0:
            self.ema = EMA(self.module, self.cfg.diffusion.ema_decay)

    def step_metrics(self) -> dict[str, float]:
        if self.ema is not None:  # called after each optimizer step
            self.ema.update()
        return {}

    def save_extra(self, ckpt_dir) -> None:
        import json

        from loongforge_diffusion.wan.weights import save_wan_config

        save_wan_config(self.wan, ckpt_dir)
        if self.ema is not None:
            self.ema.save(ckpt_dir)
        (Path(ckpt_dir) / "diffusion_assets.json").write_text(json.dumps({"latents": str(self.latents_folder().resolve())}))

    def summarize(self, result: dict) -> dict:
        d, p = self.cfg.diffusion, self.cfg.parallel
        if not (d.sample_at_end and self.rt.is_main):
            return result
        if p.tp > 1 or p.cp > 1:
            print("sample at end: skipped under tp/cp > 1 (use python -m loongforge_diffusion.generate)")
            return result
        from loongforge_diffusion.generate import sample_to_file

        if self.ema is not None:  # sample with the averaged weights
            from loongforge_diffusion.ema import load_ema_into

            self.ema.save(Path(self.cfg.output_dir))
            load_ema_into(self.module, Path(self.cfg.output_dir))
        out = Path(self.cfg.output_dir) / "samples" / f"sample.{d.sample_format}"
        sample_to_file(self.dits, self.wan, self.latents_folder(), d, d.sample_prompt, out, seed=self.cfg.seed)
        print(f"sample: {out}")
        return {**result, "sample": str(out)}


def run_preprocess(cfg, plugins) -> dict:
    """``loongforge run CONFIG task=wan_preprocess``: only the preprocessing of ``build_datasets``
    (synthetic set if asked, frozen VAE + text encoder -> latent shards), one process, no training."""
    from types import SimpleNamespace

    from loongforge_diffusion.data.latents import INDEX

    cfg = WanTask.resolve_config(cfg, plugins)
    task = WanTask(cfg, SimpleNamespace(is_main=True, rank=0, backend=None))
    folder = task.latents_folder()
    if (folder / INDEX).is_file():
        print(f"{folder} is already preprocessed ({INDEX} exists); delete it to redo")
    else:
        task.prepare_latents(folder)
    return {"latents": str(folder)}
