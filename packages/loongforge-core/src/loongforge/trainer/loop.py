"""The pre-training loop: build, (resume), step, evaluate, checkpoint, report."""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from loongforge.data.packing import collate as collate_packed
from loongforge.parallel import configure_pipeline_schedule
from loongforge.plugins import lookup
from loongforge.registry import load_object
from loongforge.trainer import checkpoint as ckpt
from loongforge.trainer import compat, signals
from loongforge.trainer.batches import masked_token_loss, model_inputs, split_for_context_parallel
from loongforge.trainer.metrics import RunLogger, flops_per_token, mfu
from loongforge.trainer.model import (
    build_model_chunks,
    load_pretrained,
    model_provider,
    resolve_model_section,
    run_settings,
)
from loongforge.trainer.optim import build_optimizer, build_scheduler
from loongforge.trainer.runtime import Runtime, runtime


def load_tokenizer(cfg, plugins):
    record = lookup(plugins.registry().tokenizers, cfg.tokenizer.type, "tokenizer type (config key 'tokenizer.type')")
    return load_object(record.loader)(cfg.tokenizer.path)


def build_datasets(cfg, tokenizer, plugins):
    record = lookup(plugins.registry().datasets, cfg.data.format, "dataset format (config key 'data.format')")
    return load_object(record.builder)(cfg.data, tokenizer, seq_length=cfg.train.seq_length, seed=cfg.seed)


class Trainer:
    """One training process. Plugins see it in the lifecycle hooks (``trainer.cfg``, ``.step``...)."""

    def __init__(self, cfg, rt: Runtime):
        from loongforge.data.tokenizer import check_vocab

        self.cfg, self.rt, self.hooks = cfg, rt, rt.plugins.hook
        self.provider = model_provider(cfg, rt.plugins)
        self.settings = run_settings(cfg)
        m = cfg.model
        self.layout = rt.layout
        self.tokenizer = load_tokenizer(cfg, rt.plugins)
        self.vocab_size = self.provider.padded_vocab_size(self.settings)
        check_vocab(self.tokenizer, int(m.get("vocab_size", self.vocab_size)))
        self.train_ds, self.valid_ds = self.build_datasets()

        rt.backend.manual_seed(cfg.seed)
        chunks = build_model_chunks(self.provider, self.settings, rt.backend, rt.plugins)
        configure_pipeline_schedule(chunks[0].config, self.layout)
        if cfg.model.get("pretrained"):
            load_pretrained(self.provider, chunks, cfg.model.pretrained)
        chunks = self._prepare_chunks(chunks)
        self.model = self.hooks.loongforge_parallelize(name="model", modules=chunks, cfg=cfg, backend=rt.backend)
        rt.backend.after_data_parallel(self.model)
        self.config = chunks[0].config
        self.optimizer = build_optimizer(cfg, self.model, rt.backend)
        self.scheduler = build_scheduler(cfg, self.optimizer)

        self.step, self.consumed_samples = 0, 0
        self.ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")
        self._maybe_resume()
        self.train_batches = self._batches(self.train_ds, self.consumed_samples)
        self.flops_token = flops_per_token(self.config, self.vocab_size, cfg.train.seq_length)

    # --- extension points for task subclasses (e.g. loongforge.trainer.sft) -------------------

    def build_datasets(self):
        """``(train, valid or None)``; the default builds ``data.format``'s registered dataset."""
        return build_datasets(self.cfg, self.tokenizer, self.rt.plugins)

    def _prepare_chunks(self, chunks: list) -> list:
        """Change the built (and pretrained-loaded) chunks before data-parallel wrapping (e.g. LoRA)."""
        return chunks

    #: samples -> one micro-batch; a task whose samples carry more (e.g. images) swaps it
    collate = staticmethod(collate_packed)

    def _batches(self, dataset, consumed_samples: int):
        """This rank's micro-batches from ``consumed_samples`` on (resumable to the sample)."""
        from loongforge.data.builder import build_pretrain_dataloader

        return iter(build_pretrain_dataloader(
            dataset, micro_batch_size=self.cfg.train.micro_batch_size,
            global_batch_size=self.cfg.train.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.layout.dp,
            consumed_samples=consumed_samples, seed=self.cfg.seed, collate_fn=self.collate,
        ))

    # --- checkpoints ---------------------------------------------------------------------------

    def _maybe_resume(self) -> None:
        load = self.cfg.checkpoint.load
        path = ckpt.latest_checkpoint(self.ckpt_dir) if load == "auto" else (Path(load) if load else None)
        if path is None:
            return
        compat.check_resume(self.cfg, path, self.rt.plugins)  # before anything is loaded
        weights_only = self.cfg.checkpoint.weights_only
        state = ckpt.load_checkpoint(path, self.model, None if weights_only else self.optimizer,
                                     self.rt.backend, load_rng=not weights_only)
        if not weights_only:
            self.step, self.consumed_samples = state["step"], state["consumed_samples"]
            self.saved_step = self.step
            warn_schedule_change(path, state["scheduler"], self.scheduler.state_dict())
            self.scheduler.load_state_dict(state["scheduler"])
        self.hooks.loongforge_on_checkpoint_load(trainer=self, step=self.step, path=str(path))

    def save(self) -> Path:
        state = {"step": self.step, "consumed_samples": self.consumed_samples,
                 "scheduler": self.scheduler.state_dict()}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, state,
                                    self.rt.backend, self.cfg.checkpoint.keep_last)
        self.saved_step = self.step
        if self.rt.is_main:
            OmegaConf.save(self.cfg, self.ckpt_dir / "config.yaml")
            self.tokenizer.save_pretrained(str(self.ckpt_dir / "tokenizer"))
        self.hooks.loongforge_on_checkpoint_save(trainer=self, step=self.step, path=str(path))
        return path

    # --- one step --------------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model):
        batch = split_for_context_parallel(next(data_iterator))  # this CP rank's tokens (cp=1: all)
        inputs = model_inputs(batch, self.rt.backend.device(), self.cfg.data.document_attention)
        output = model(**inputs)
        return output, functools.partial(masked_token_loss, batch["loss_mask"])

    def _run_schedule(self, microbatches: list[dict], forward_only: bool) -> torch.Tensor:
        """Forward (and backward) over ``microbatches``; returns [summed loss, tokens] over the world,
        on the device (read it after the optimizer step is queued: reading syncs with the GPU)."""
        iters = [iter(microbatches) for _ in self.model]
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )
        # on the device: NCCL reduces only device tensors
        totals = torch.zeros(2, dtype=torch.float64, device=self.rt.backend.device())
        for item in losses or ():
            totals += torch.stack([item["loss_sum"].double(), item["tokens"].double()])
        # every model-parallel copy of a data-parallel replica adds the same numbers to both sums
        dist.all_reduce(totals)
        return totals

    def _next_global_batch(self) -> list[dict]:
        batches = [next(self.train_batches) for _ in range(self.layout.num_microbatches)]
        self.consumed_samples += self.cfg.train.global_batch_size
        return batches

    def train_step(self) -> dict[str, float]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals = self._run_schedule(self._next_global_batch(), forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()  # grad_norm: a float, a device tensor or None
        self.step += 1
        self.scheduler.step(increment=1)
        loss_sum, tokens = totals.tolist()
        return {"loss": loss_sum / max(tokens, 1), "grad_norm": 0.0 if grad_norm is None else float(grad_norm),
                "skipped": float(not ok)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.valid_ds is None:
            return {}
        batches = self._batches(self.valid_ds, 0)
        loss_sum = tokens = 0.0
        for _ in range(self.cfg.train.eval_steps):
            mbs = [next(batches) for _ in range(self.layout.num_microbatches)]
            s, t = self._run_schedule(mbs, forward_only=True).tolist()
            loss_sum, tokens = loss_sum + s, tokens + t
        for chunk in self.model:
            chunk.train()
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())}

    # --- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, rt = self.cfg, self.rt
        total = cfg.train.steps
        logger = RunLogger(cfg, total, self.step, enabled=rt.is_main)
        self.hooks.loongforge_on_train_start(trainer=self)
        first_loss = last_loss = None
        peak = rt.backend.peak_flops(cfg.train.precision)
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        stop = signals.StopOnSignal(rt.backend.device(), verbose=rt.is_main).install()  # SIGTERM/SIGINT: save, exit
        try:
            while self.step < total:
                rt.backend.synchronize()
                start = time.perf_counter()
                metrics = self.train_step()
                rt.backend.synchronize()
                elapsed = time.perf_counter() - start
                tps = tokens_per_step / elapsed
                metrics |= {"lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tps,
                            "mfu": mfu(tps / rt.world_size, self.flops_token, peak),
                            **rt.backend.memory_stats()}
                first_loss = metrics["loss"] if first_loss is None else first_loss
                last_loss = metrics["loss"]
                if self.step % cfg.train.log_interval == 0 or self.step == total:
                    logger.log(self.step, metrics)
                self.hooks.loongforge_on_step_end(trainer=self, step=self.step, metrics=metrics)
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                    eval_metrics = self.evaluate()
                    logger.log_eval(self.step, eval_metrics)
                    self.hooks.loongforge_on_evaluate(trainer=self, step=self.step, metrics=eval_metrics)
                if cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0:
                    self.save()
                if stop.requested():
                    break
            if (cfg.checkpoint.save_final or stop.signum) and getattr(self, "saved_step", None) != self.step:
                self.save()  # unless this run saved this step already
            stop.raise_if_stopped(self.step, total, self.ckpt_dir / f"step_{self.step:08d}")
        finally:
            stop.uninstall()
            logger.close()
        curve = logger.save_loss_curve(self.ckpt_dir / "loss_curve.png") if cfg.logging.loss_curve else None
        if first_loss is not None:
            logger.print(f"loss: {first_loss:.4f} (first step) -> {last_loss:.4f} (step {self.step})")
        if curve:
            logger.print(f"loss curve: {curve}")
        logger.print(f"checkpoint: {self.ckpt_dir}")
        self.hooks.loongforge_on_train_end(trainer=self)
        return {"first_loss": first_loss, "last_loss": last_loss, "history": logger.history}


#: scheduler state keys -> the config keys that set them
_SCHEDULE_KEYS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "scheduler.warmup_steps",
                  "lr_decay_steps": "scheduler.decay_steps (default: train.steps)",
                  "lr_decay_style": "scheduler.type"}


def warn_schedule_change(path, saved: dict, configured: dict) -> None:
    """Resuming continues the step count but follows the config's LR schedule; say so when the
    checkpoint was trained under another one (e.g. a run extended with a larger train.steps)."""
    changed = [f"{key} {saved[name]} -> {configured[name]}" for name, key in _SCHEDULE_KEYS.items()
               if name in saved and saved[name] != configured[name]]
    if changed:
        warnings.warn(f"resuming from {path}: the LR schedule follows the config, not the checkpoint's: "
                      + "; ".join(changed), stacklevel=2)


def run_pretrain(cfg, plugins) -> dict:
    """The ``pretrain`` task."""
    cfg = resolve_model_section(cfg, plugins)  # model.pretrained fills in the sizes validated first
    with runtime(cfg, plugins) as rt:
        return Trainer(cfg, rt).fit()
