"""The ``sft`` task: the pre-training loop on conversation data, optionally with LoRA.

What differs from pre-training (everything else -- forward step, loss, checkpoints -- is shared):

* data: :func:`loongforge.data.sft.build_sft_dataset` (chat template, assistant-only loss,
  truncation, packing with per-conversation positions and segments);
* sampling: :class:`loongforge.data.sft.BalancedSampler` re-splits each global batch over the
  data-parallel ranks by estimated cost (``sft.balance_dp``);
* model: with ``peft.lora.rank > 0`` the base weights are frozen and LoRA adapters added before
  data-parallel wrapping, so megatron-core's DDP and optimizer only see the adapters; a
  ``checkpoint.load`` without adapters (``weights_only``) is loaded as the base before that.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core import parallel_state

from loongforge.config import ConfigError
from loongforge.trainer import checkpoint as ckpt
from loongforge.trainer.lm import LanguageModelTask
from loongforge.trainer.loop import Trainer, train


class SFTTask(LanguageModelTask):
    """The pre-training task with the three differences of the module docstring."""

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self._balance_log: list[tuple[float, float]] = []
        self.base_checkpoint = None

    def build_datasets(self):
        from loongforge.data.sft import build_sft_dataset

        train, valid = build_sft_dataset(self.cfg, self.tokenizer, self.cfg.train.seq_length, self.cfg.seed)
        self.sft_stats = train.stats
        self._train_ds = train
        return train, valid

    def build_model(self) -> list:
        from loongforge.peft.lora import apply_lora_config

        chunks = super().build_model()
        self.base_checkpoint = self._adapterless_checkpoint()
        if self.base_checkpoint is not None:
            # the base weights, loaded before the adapters exist; the trainer's resume then finds
            # no checkpoint.load of its own to apply (see resolve_config)
            ckpt.load_checkpoint(self.base_checkpoint, chunks, None, self.rt.backend, load_rng=False)
        self.lora_modules = apply_lora_config(chunks, self.cfg)
        return chunks

    def _adapterless_checkpoint(self) -> Path | None:
        """``checkpoint.load`` of a LoRA run naming a checkpoint without adapters (pre-training's,
        a full fine-tune's): its weights are the base, loaded before the adapters exist."""
        from torch.distributed.checkpoint import FileSystemReader

        load = self.cfg.checkpoint.load
        if self.cfg.peft.lora.rank < 1 or not load or load == "auto":
            return None
        path = Path(load)
        if not (path / "trainer_state.json").is_file():
            return None  # the trainer's own load names the problem
        # the tensor names in torch.distributed.checkpoint's metadata (megatron writes that format)
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if any(k.endswith(("lora_A", "lora_B")) for k in stored):
            return None
        if not self.cfg.checkpoint.weights_only:
            raise ConfigError(f"config key 'checkpoint.load': {path} holds no LoRA adapters, so it cannot resume "
                              "this LoRA run's optimizer; set checkpoint.weights_only=true to start from its weights")
        return path

    def _cost_b(self) -> float:
        b = self.cfg.sft.cost_b
        return float(b) if b is not None else 1.0 / (12.0 * int(self.cfg.model.get("hidden_size", 1024)))

    def batch_sampler(self, dataset, consumed_samples: int, training: bool):
        from loongforge.data.sft import BalancedSampler

        if not (self.cfg.sft.balance_dp and hasattr(dataset, "sample_lengths")):
            return None
        return BalancedSampler(
            dataset, micro_batch_size=self.cfg.train.micro_batch_size,
            global_batch_size=self.cfg.train.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.rt.layout.dp,
            consumed_samples=consumed_samples, seed=self.cfg.seed,
            cost_a=self.cfg.sft.cost_a, cost_b=self._cost_b(),
            on_batch=(lambda step, before, after: self._balance_log.append((before, after))) if training else None,
        )

    def resume_from(self, path):
        return None if self.base_checkpoint is not None else path  # the base was loaded before the adapters

    def step_metrics(self) -> dict[str, float]:
        if self._balance_log and self.rt.layout.dp > 1:
            before, after = self._balance_log[-1]
            return {"dp_imbalance_before": before, "dp_imbalance_after": after}
        return {}

    def on_train_start(self, trainer: Trainer) -> None:
        """Data and trainable-parameter summary (main rank), once the trainer is built."""
        if not self.rt.is_main:
            return
        from loongforge.peft.lora import trainable_summary

        s = self.sft_stats
        print(f"sft data: {s.summary()}", flush=True)
        counts = trainable_summary(trainer.model)
        # what the optimizer really holds (its fp32 copies under bf16): the adapters only under LoRA
        held = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
        moments = held * 8  # Adam: two fp32 moments per parameter
        lora = self.cfg.peft.lora
        what = f"LoRA rank {lora.rank} on {len(self.lora_modules)} linears" if lora.rank > 0 else "full fine-tuning"
        print(f"sft model ({what}): {counts['trainable']:,} trainable of {counts['total']:,} parameters "
              f"({100 * counts['trainable'] / max(1, counts['total']):.2f}%) on this rank; optimizer over "
              f"{held:,} parameters, Adam state {moments / 2**20:.2f} MiB", flush=True)

    def summarize(self, result: dict) -> dict:
        result["sft_stats"] = self.sft_stats
        if self._balance_log:
            before = [b for b, _ in self._balance_log]
            after = [a for _, a in self._balance_log]
            result["dp_imbalance"] = (sum(before) / len(before), sum(after) / len(after))
            if self.rt.is_main and self.rt.layout.dp > 1:
                print(f"dp load balance: max/mean cost {result['dp_imbalance'][0]:.3f} (contiguous split) -> "
                      f"{result['dp_imbalance'][1]:.3f} (balanced)", flush=True)
        return result


def SFTTrainer(cfg, rt) -> Trainer:  # noqa: N802 - reads as the class it used to be
    """The core's trainer running the ``sft`` task in runtime ``rt`` (for scripts and tests)."""
    return Trainer(cfg, rt, SFTTask(cfg, rt))


def run_sft(cfg, plugins) -> dict:
    """Train ``cfg`` as the ``sft`` task in this process."""
    return train(cfg, plugins, SFTTask)
