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
from loongforge.trainer.loop import Trainer
from loongforge.trainer.model import resolve_model_section
from loongforge.trainer.runtime import runtime


class SFTTrainer(Trainer):
    """The pre-training :class:`Trainer` with the three differences of the module docstring."""

    def __init__(self, cfg, rt):
        self._balance_log: list[tuple[float, float]] = []
        super().__init__(cfg, rt)
        self._report_start()

    def build_datasets(self):
        from loongforge.data.sft import build_sft_dataset

        train, valid = build_sft_dataset(self.cfg, self.tokenizer, self.cfg.train.seq_length, self.cfg.seed)
        self.sft_stats = train.stats
        return train, valid

    def _prepare_chunks(self, chunks):
        from loongforge.peft.lora import apply_lora_config

        self._base_checkpoint = self._adapterless_checkpoint()
        if self._base_checkpoint is not None:
            ckpt.load_checkpoint(self._base_checkpoint, chunks, None, self.rt.backend, load_rng=False)
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

    def _maybe_resume(self) -> None:
        if self._base_checkpoint is None:
            super()._maybe_resume()
        else:
            self.hooks.loongforge_on_checkpoint_load(trainer=self, step=self.step, path=str(self._base_checkpoint))

    def _cost_b(self) -> float:
        b = self.cfg.sft.cost_b
        return float(b) if b is not None else 1.0 / (12.0 * int(self.cfg.model.get("hidden_size", 1024)))

    def _batches(self, dataset, consumed_samples: int):
        from torch.utils.data import DataLoader

        from loongforge.data.packing import collate
        from loongforge.data.sft import BalancedSampler

        if not (self.cfg.sft.balance_dp and hasattr(dataset, "sample_lengths")):
            return super()._batches(dataset, consumed_samples)
        training = dataset is self.train_ds
        sampler = BalancedSampler(
            dataset, micro_batch_size=self.cfg.train.micro_batch_size,
            global_batch_size=self.cfg.train.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.layout.dp,
            consumed_samples=consumed_samples, seed=self.cfg.seed,
            cost_a=self.cfg.sft.cost_a, cost_b=self._cost_b(),
            on_batch=(lambda step, before, after: self._balance_log.append((before, after))) if training else None,
        )
        return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))

    def train_step(self) -> dict[str, float]:
        metrics = super().train_step()
        if self._balance_log and self.layout.dp > 1:
            before, after = self._balance_log[-1]
            metrics |= {"dp_imbalance_before": before, "dp_imbalance_after": after}
        return metrics

    def _report_start(self) -> None:
        if not self.rt.is_main:
            return
        from loongforge.peft.lora import trainable_summary

        s = self.sft_stats
        print(f"sft data: {s.summary()}", flush=True)
        counts = trainable_summary(self.model)
        # what the optimizer really holds (its fp32 copies under bf16): the adapters only under LoRA
        held = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        moments = held * 8  # Adam: two fp32 moments per parameter
        lora = self.cfg.peft.lora
        what = f"LoRA rank {lora.rank} on {len(self.lora_modules)} linears" if lora.rank > 0 else "full fine-tuning"
        print(f"sft model ({what}): {counts['trainable']:,} trainable of {counts['total']:,} parameters "
              f"({100 * counts['trainable'] / max(1, counts['total']):.2f}%) on this rank; optimizer over "
              f"{held:,} parameters, Adam state {moments / 2**20:.2f} MiB", flush=True)


def run_sft(cfg, plugins) -> dict:
    """The ``sft`` task."""
    cfg = resolve_model_section(cfg, plugins)  # model.pretrained fills in the sizes validated first
    with runtime(cfg, plugins) as rt:
        trainer = SFTTrainer(cfg, rt)
        result = trainer.fit()
        result["sft_stats"] = trainer.sft_stats
        if trainer._balance_log:
            before = [b for b, _ in trainer._balance_log]
            after = [a for _, a in trainer._balance_log]
            result["dp_imbalance"] = (sum(before) / len(before), sum(after) / len(after))
            if rt.is_main and trainer.layout.dp > 1:
                print(f"dp load balance: max/mean cost {result['dp_imbalance'][0]:.3f} (contiguous split) -> "
                      f"{result['dp_imbalance'][1]:.3f} (balanced)", flush=True)
        return result
