"""Text -> short video with a trained Wan DiT: embed the prompt, sample latents, decode, write gif/mp4.

From a training run's checkpoint (one process; any saved TP/CP/DP layout, resharded on load)::

    python -m loongforge_diffusion.generate outputs/wan_tiny/checkpoints --prompt "a red square moving right" \\
        --out sample.gif

The prompt encoder, VAE and null (empty-prompt) embedding are the ones the run preprocessed its
data with (``<latents>/encoders``, ``null_text.safetensors``; the checkpoint's
``diffusion_assets.json`` names the folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _velocity(dit, wan):
    def velocity(x, t, text):
        param = next(dit.parameters())
        return dit(x.to(param.dtype), t.to(torch.float64), text.to(param.dtype)).float()

    return velocity


def sample_video(dits, wan, encoders, null_text, prompt: str, *, num_frames: int, height: int, width: int,
                 steps: int, guidance: float, shift: float, solver: str, seed: int) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames for ``prompt``."""
    from loongforge_diffusion.sampler import route_experts, sample
    from loongforge_diffusion.wan.flops import latent_grid

    for d in dits:
        d.eval()
    text = encoders.encode_text([prompt])
    if len(dits) == 2:
        velocity = route_experts(_velocity(dits[0], wan), _velocity(dits[1], wan), wan.boundary_ratio)
    else:
        velocity = _velocity(dits[0], wan)
    shape = (1, wan.out_channels, *latent_grid(wan, num_frames, height, width))
    latents = sample(velocity, shape, text, null_text[None], steps=steps, guidance=guidance, shift=shift,
                     solver=solver, generator=torch.Generator().manual_seed(seed),
                     device=next(dits[0].parameters()).device)
    video = encoders.decode_latents(latents.cpu().float())[0]  # [3, F, H, W] in [-1, 1]
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    elif path.suffix == ".mp4":
        from loongforge_diffusion.data.synthetic import write_mp4

        write_mp4(path, frames, fps)
    else:
        raise ValueError(f"{path}: write a .gif or .mp4")
    return path


def sample_to_file(dits, wan, latents_folder, d, prompt: str, out, seed: int = 0) -> Path:
    """Sample with the settings of the ``diffusion`` section ``d`` and write ``out``."""
    from safetensors.torch import load_file

    from loongforge_diffusion.data.encoders import Encoders

    folder = Path(latents_folder)
    encoders = Encoders.load(folder / "encoders", wan.text_len)
    null_text = load_file(str(folder / "null_text.safetensors"))["null_text"]
    height, width = d.buckets[0]
    with torch.no_grad():
        frames = sample_video(dits, wan, encoders, null_text, prompt, num_frames=d.num_frames, height=height,
                              width=width, steps=d.sample_steps, guidance=d.sample_guidance, shift=d.shift,
                              solver=d.sample_solver, seed=seed)
    return write_video(out, frames)


def generate_from_checkpoint(checkpoint: str, prompt: str, out: str, *, steps: int | None = None,
                             guidance: float | None = None, solver: str | None = None, seed: int = 0) -> Path:
    from loongforge.generate import _resolve
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import load_checkpoint
    from loongforge.trainer.runtime import runtime
    from omegaconf import OmegaConf

    from loongforge_diffusion.task import WanTask

    root, step_dir = _resolve(checkpoint)
    cfg = OmegaConf.load(root / "config.yaml")
    from loongforge.parallel import single_process_layout

    cfg.parallel = single_process_layout()
    cfg.model.pop("pretrained", None)  # the checkpoint holds every weight
    for key, value in (("sample_steps", steps), ("sample_guidance", guidance), ("sample_solver", solver)):
        if value is not None:
            cfg.diffusion[key] = value
    assets = json.loads((step_dir / "diffusion_assets.json").read_text()) if (
        step_dir / "diffusion_assets.json").is_file() else json.loads((root / "diffusion_assets.json").read_text())
    plugins = get_plugin_manager()
    with runtime(cfg, plugins) as rt:
        task = WanTask(cfg, rt)
        chunks = task.build_model()
        load_checkpoint(step_dir, chunks, None, rt.backend, load_rng=False)
        if cfg.diffusion.get("ema_decay"):
            from loongforge_diffusion.ema import load_ema_into

            load_ema_into(task.module, root)  # the EMA written with the latest checkpoint
        return sample_to_file(task.dits, task.wan, assets["latents"], cfg.diffusion, prompt, out, seed=seed)


def generate(checkpoint: str, *, prompt: str | None, output: str | None, seed: int = 0,
             num_steps: int | None = None) -> str:
    """``loongforge generate CKPT --prompt TEXT --output x.gif [--steps N]`` for a ``wan_pretrain`` checkpoint."""
    from loongforge.config import ConfigError

    if not prompt:
        raise ConfigError("generate: a Wan checkpoint needs --prompt (the text to condition on)")
    out = output or "sample.gif"
    return str(generate_from_checkpoint(checkpoint, prompt, out, steps=num_steps, seed=seed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loongforge_diffusion.generate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a run's checkpoints directory or one step directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output .gif or .mp4")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--solver", choices=["euler", "unipc"], default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = generate_from_checkpoint(a.checkpoint, a.prompt, a.out, steps=a.steps, guidance=a.guidance,
                                    solver=a.solver, seed=a.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
