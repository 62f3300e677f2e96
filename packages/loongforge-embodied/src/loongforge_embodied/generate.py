"""``loongforge generate`` for a ``vla_train`` checkpoint: an action chunk for one observation.

The observation is a frame of the run's dataset (``vla.data_root``): ``--prompt "episode=E,frame=F"``
picks it (default episode 0, frame 0); any other prompt text replaces the dataset's task text.
The chunk is sampled with ``--steps`` Euler steps (default ``vla.num_inference_steps``) from
noise seeded by ``--seed``, un-normalised with the statistics saved beside the checkpoint
(``vla.json``), printed, and written as JSON to ``--output`` when given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf


def _resolve(checkpoint: str) -> tuple[Path, Path]:
    from loongforge.trainer.checkpoint import CheckpointError, latest_checkpoint

    path = Path(checkpoint)
    root = path if (path / "config.yaml").is_file() else path.parent
    step = path if (path / "trainer_state.json").is_file() else latest_checkpoint(root)
    if step is None or not (root / "vla.json").is_file():
        raise CheckpointError(f"{checkpoint}: not a complete vla_train checkpoint (config.yaml, vla.json, latest)")
    return root, step


def load_policy(checkpoint: str):
    """-> (policy on CPU in eval mode, cfg, vla.json info). Needs an initialised runtime (the
    core's distributed checkpoint loader); :func:`generate` provides one."""

    from loongforge_embodied.lora import apply_lora
    from loongforge_embodied.policy import VLAPolicy, transformer_config
    from loongforge_embodied.task import pi_config

    root, step = _resolve(checkpoint)
    cfg = OmegaConf.load(root / "config.yaml")
    info = json.loads((root / "vla.json").read_text())
    pc = pi_config(cfg)
    policy = VLAPolicy(pc, transformer_config(pc), info["action_dim"])
    if cfg.vla.finetune == "lora":
        apply_lora(policy.net, cfg.vla.lora_targets, cfg.vla.lora_rank, cfg.vla.lora_alpha)
    return policy, cfg, info, root, step


def generate(checkpoint: str, *, prompt: str | None, output: str | None, seed: int, num_steps: int | None) -> str:
    """``Task.generate`` of ``vla_train``."""
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import load_checkpoint
    from loongforge.trainer.runtime import runtime

    from loongforge_embodied.data.lerobot_v3 import LeRobotV3Dataset, Normalizer
    from loongforge_embodied.data.samples import PolicySamples
    from loongforge_embodied.pi05.prompt import load_tokenizer

    policy, cfg, info, root, step = load_policy(checkpoint)
    from loongforge.parallel import single_process_layout

    cfg.parallel = single_process_layout()
    with runtime(cfg, get_plugin_manager()) as rt:
        load_checkpoint(step, [policy], None, rt.backend, load_rng=False)
    policy = policy.eval()
    m = re.fullmatch(r"\s*episode=(\d+)(?:\s*,\s*frame=(\d+))?\s*", prompt or "")
    episode, frame = (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)
    data_root = Path(cfg.vla.data_root) if cfg.vla.data_root != "builtin:reaching" else Path(cfg.output_dir) / "reaching"
    ds = LeRobotV3Dataset(data_root, chunk_size=policy.pc.chunk_size, cameras=info["cameras"],
                          state_key=cfg.vla.state_key, action_key=cfg.vla.action_key,
                          normalization=cfg.vla.normalization, episodes=[episode])
    if frame >= len(ds):
        raise ValueError(f"generate: episode {episode} has {len(ds)} frames; frame={frame} is past its end")
    if prompt and not m:
        ds.tasks = {k: prompt for k in ds.tasks}
    s = PolicySamples(ds, policy.pc, load_tokenizer(cfg.vla.tokenizer), cfg.vla.tokenizer_max_length)[frame]
    b = torch.utils.data.default_collate([s])
    steps = num_steps or cfg.vla.num_inference_steps
    chunk = policy.sample(b["images"], b["image_masks"], b["tokens"], b["token_masks"], b["state"], steps=steps,
                          generator=torch.Generator().manual_seed(seed))[0].numpy()
    n = info["normalization"]["action"]
    actions = Normalizer(n["mode"], np.asarray(n["a"], np.float32), np.asarray(n["b"], np.float32)).inverse(chunk)
    result = {"checkpoint": str(step), "episode": episode, "frame": frame, "steps": steps,
              "actions": np.asarray(actions).round(6).tolist()}
    if output:
        Path(output).write_text(json.dumps(result))
    rows = "\n".join(" ".join(f"{x:+.4f}" for x in row) for row in result["actions"])
    return f"action chunk ({len(actions)} x {actions.shape[1]}) for episode {episode} frame {frame}:\n{rows}"
