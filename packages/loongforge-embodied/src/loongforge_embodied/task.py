"""``vla_train``: flow-matching training of a Pi0 / Pi0.5 policy on a LeRobotDataset v3.0.

A :class:`loongforge.task.TrainTask` (unit = samples): the core's trainer keeps the layout, data
parallelism (+ distributed optimizer), optimizer, schedule, checkpoints and metrics; this task
supplies the policy, the dataset and the loss. Its keys live in the ``vla`` config section
(:class:`VLAConfig`). Fine-tuning: ``vla.finetune`` = ``full`` | ``lora`` (adapters on the
matching linears, everything else frozen) | ``expert_only`` (the VLM and vision frozen, lerobot's
``train_expert_only``); ``vla.freeze_vision`` freezes the SigLIP tower and projector.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loongforge.config import ConfigError
from loongforge.task import TrainTask

BUILTIN_REACHING = "builtin:reaching"
MAPPINGS = ("ours", "lerobot", "lerobot_policy", "hf_pi0")


@dataclass
class VLAConfig:
    #: PiConfig fields: mode (pi0 | pi05), vision / vlm / expert sizes, chunk_size, max_state_dim...
    model: dict[str, Any] = field(default_factory=dict)
    #: a LeRobotDataset v3.0 directory, or builtin:reaching (the synthetic set, written to output_dir)
    data_root: str = BUILTIN_REACHING
    cameras: list[str] | None = None          # None: every video feature
    state_key: str = "observation.state"
    action_key: str = "action"
    normalization: str = "quantiles"          # quantiles | mean_std | min_max | identity
    valid_episodes: list[int] | None = None   # held out from training, used for evaluation
    tokenizer: str = "builtin:bytes"          # or a local HF tokenizer directory (PaliGemma's)
    tokenizer_max_length: int = 64
    pretrained: str | None = None             # a safetensors file of weights
    pretrained_format: str = "lerobot"        # ours | lerobot | lerobot_policy | hf_pi0
    finetune: str = "full"                    # full | lora | expert_only
    freeze_vision: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    num_inference_steps: int = 10


def pi_config(cfg):
    from omegaconf import OmegaConf

    from loongforge_embodied.pi05.config import PiConfig

    return PiConfig.from_dict(OmegaConf.to_container(cfg.vla.model, resolve=True))


def mapping(fmt: str):
    from loongforge_embodied.pi05.mapping import hf_pi0_mapping, lerobot_mapping

    return {"lerobot": lerobot_mapping(), "lerobot_policy": lerobot_mapping("model."), "hf_pi0": hf_pi0_mapping()}[fmt]


class VLATrainTask(TrainTask):
    unit = "samples"

    @classmethod
    def resolve_config(cls, cfg, plugins):
        v = cfg.vla
        pi_config(cfg)  # validates vla.model
        if v.finetune not in ("full", "lora", "expert_only"):
            raise ConfigError(f"config key 'vla.finetune': {v.finetune!r} (full, lora, expert_only)")
        if v.pretrained_format not in MAPPINGS:
            raise ConfigError(f"config key 'vla.pretrained_format': {v.pretrained_format!r} ({', '.join(MAPPINGS)})")
        if v.pretrained and not Path(v.pretrained).is_file():
            raise ConfigError(f"config key 'vla.pretrained': {v.pretrained} is not a safetensors file")
        for key in ("tp", "pp", "cp"):
            if int(cfg.parallel.get(key) or 1) > 1:
                raise ConfigError(f"config key 'parallel.{key}': vla_train runs data parallel only "
                                  f"(tensor/pipeline/context parallelism of the backbone is not implemented)")
        return cfg

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        from loongforge_embodied.data.samples import NoiseSource
        from loongforge_embodied.flow_matching import FlowMatching
        from loongforge_embodied.pi05.prompt import load_tokenizer

        self.pc = pi_config(cfg)
        self.tokenizer = load_tokenizer(cfg.vla.tokenizer)
        if self.tokenizer.vocab_size > self.pc.vocab_size:
            raise ConfigError(f"config key 'vla.model.vocab_size': {self.pc.vocab_size} < the tokenizer's "
                              f"{self.tokenizer.vocab_size} tokens ({cfg.vla.tokenizer})")
        self.flow = FlowMatching()
        self.noise = NoiseSource(cfg.seed, self.flow, self.pc.chunk_size, self.pc.max_action_dim)

    # -- data -------------------------------------------------------------------------------------
    def data_root(self) -> Path:
        root = self.cfg.vla.data_root
        if root != BUILTIN_REACHING:
            return Path(root)
        import torch.distributed as dist

        from loongforge_embodied.data.synthetic import write_reaching_dataset

        path = Path(self.cfg.output_dir) / "reaching"
        if self.rt.is_main and not (path / "meta/info.json").is_file():
            write_reaching_dataset(path)
        if dist.is_initialized():
            dist.barrier()
        return path

    def build_datasets(self):
        from loongforge_embodied.data.lerobot_v3 import LeRobotV3Dataset
        from loongforge_embodied.data.samples import PolicySamples, check_dims

        v, root = self.cfg.vla, self.data_root()
        probe = LeRobotV3Dataset(root, chunk_size=self.pc.chunk_size, cameras=v.cameras, state_key=v.state_key,
                                 action_key=v.action_key, normalization=v.normalization)
        check_dims(probe, self.pc, str(root))
        held = list(v.valid_episodes or [])
        self.action_dim, self.cameras = probe.action_dim, probe.cameras
        self.stats = {"state": probe.normalize_state, "action": probe.normalize_action}

        def make(eps):
            ds = LeRobotV3Dataset(root, chunk_size=self.pc.chunk_size, cameras=v.cameras, state_key=v.state_key,
                                  action_key=v.action_key, normalization=v.normalization, episodes=eps)
            return PolicySamples(ds, self.pc, self.tokenizer, v.tokenizer_max_length)

        train = make([e for e in probe.episodes if e not in held]) if held else PolicySamples(
            probe, self.pc, self.tokenizer, v.tokenizer_max_length)
        return train, (make(held) if held else None)

    # -- model ------------------------------------------------------------------------------------
    def build_model(self):
        from loongforge.trainer.model import wrap_precision

        from loongforge_embodied.lora import apply_lora
        from loongforge_embodied.policy import VLAPolicy, transformer_config

        v = self.cfg.vla
        bf16 = self.cfg.train.precision == "bf16"
        config = transformer_config(self.pc, bf16)
        policy = VLAPolicy(self.pc, config, self.action_dim, self.flow)
        if v.pretrained:
            self.load_weights(policy.net, v.pretrained, v.pretrained_format)
        frozen = set(policy.net.unused_in_training())
        names = dict(policy.net.named_parameters())
        if v.finetune == "expert_only":
            frozen |= {n for n in names if n.startswith(("vision.", "projector.", "embed_tokens.", "vlm_"))}
        if v.freeze_vision:
            frozen |= {n for n in names if n.startswith(("vision.", "projector."))}
        if v.finetune == "lora":
            apply_lora(policy.net, v.lora_targets, v.lora_rank, v.lora_alpha)
            frozen = {n for n, _ in policy.net.named_parameters() if "lora_" not in n}
        for n, p in policy.net.named_parameters():
            p.requires_grad_(n not in frozen)
        policy = policy.to(self.rt.backend.device())
        return wrap_precision([policy], config, bf16)

    @staticmethod
    def load_weights(net, path: str, fmt: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(path)
        if fmt != "ours":
            tensors = mapping(fmt).to_ours(tensors)
        res = net.load_state_dict(tensors, strict=False)
        if res.missing_keys or res.unexpected_keys:
            raise ConfigError(f"config key 'vla.pretrained': {path} does not fit vla.model "
                              f"(missing {res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]})")

    # -- step -------------------------------------------------------------------------------------
    def forward_step(self, batch, model):
        device = self.rt.backend.device()
        noise, time = self.noise(batch["index"])
        keys = ("images", "image_masks", "tokens", "token_masks", "state", "actions", "action_valid")
        inputs = {k: batch[k].to(device) for k in keys}
        out = model(**inputs, noise=noise.to(device), time=time.to(device))
        return out, per_sample_loss

    def flops_per_unit(self):
        from loongforge_embodied.policy import train_flops_per_sample

        return train_flops_per_sample(self.pc, len(getattr(self, "cameras", [None])), self.cfg.vla.tokenizer_max_length)

    def save_extra(self, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        info = {"pi_config": asdict(self.pc), "action_dim": self.action_dim, "cameras": self.cameras,
                "normalization": {k: {"mode": n.mode, "a": n.a.tolist(), "b": n.b.tolist()}
                                  for k, n in self.stats.items()}}
        (ckpt_dir / "vla.json").write_text(json.dumps(info, indent=1))

    def summarize(self, result):
        return result | {"mode": self.pc.mode, "action_dim": self.action_dim}


def per_sample_loss(losses: torch.Tensor):
    total = losses.sum()
    count = torch.tensor(losses.numel(), dtype=torch.int)
    return total, count, {"loss_sum": total.detach().clone(), "tokens": count}
