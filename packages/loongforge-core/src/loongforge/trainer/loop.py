"""The training loop of every task: build, (resume), step, evaluate, checkpoint, report.

The task (:mod:`loongforge.task`) supplies the model, data and loss; this module keeps the rest.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from loongforge.parallel import configure_pipeline_schedule
from loongforge.plugins import lookup
from loongforge.registry import load_object
from loongforge.task import TrainTask
from loongforge.trainer import checkpoint as ckpt
from loongforge.trainer import compat, signals
from loongforge.trainer.metrics import RunLogger, mfu
from loongforge.trainer.model import per_token_loss_settings
from loongforge.trainer.optim import build_optimizer, build_scheduler
from loongforge.trainer.runtime import Runtime, runtime


class Trainer:
    """One training process of a task (:class:`loongforge.task.TrainTask`). The trainer keeps the
    layout, optimizer, schedule, data order, checkpoints, metrics and hooks; the task supplies the
    model, the data and the loss. Plugins see it in the lifecycle hooks (``trainer.cfg``,
    ``.step``, ``.task``, ``.model``...)."""

    def __init__(self, cfg, rt: Runtime, task: TrainTask):
        self.cfg, self.rt, self.task, self.hooks = cfg, rt, task, rt.plugins.hook
        self.layout = rt.layout
        self.train_ds, self.valid_ds = task.build_datasets()

        rt.backend.manual_seed(cfg.seed)
        chunks = task.build_model()
        self.config = chunks[0].config
        per_token_loss_settings(self.config)
        _complete_module_contract(chunks, self.layout.pp)
        configure_pipeline_schedule(self.config, self.layout)
        self.model = self.hooks.loongforge_parallelize(name="model", modules=chunks, cfg=cfg, backend=rt.backend)
        rt.backend.after_data_parallel(self.model)
        self.optimizer = build_optimizer(cfg, self.model, rt.backend)
        self.scheduler = build_scheduler(cfg, self.optimizer)

        self.step, self.consumed_samples = 0, 0
        self.ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")
        self._maybe_resume()
        self.train_batches = self._batches(self.train_ds, self.consumed_samples)
        self.units_per_sample = task.units_per_sample()
        self.flops_unit = task.flops_per_unit()
        task.on_train_start(self)

    def _batches(self, dataset, consumed_samples: int):
        """This rank's micro-batches from ``consumed_samples`` on (resumable to the sample)."""
        from torch.utils.data import DataLoader

        from loongforge.data.sampler import PretrainingSampler

        sampler = self.task.batch_sampler(dataset, consumed_samples, training=dataset is self.train_ds)
        if sampler is None:
            sampler = PretrainingSampler(
                len(dataset), self.cfg.train.micro_batch_size, self.cfg.train.global_batch_size,
                parallel_state.get_data_parallel_rank(), self.layout.dp,
                consumed_samples=consumed_samples, seed=self.cfg.seed)
        return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=self.task.collate))

    # --- checkpoints ---------------------------------------------------------------------------

    def _maybe_resume(self) -> None:
        load = self.cfg.checkpoint.load
        path = ckpt.latest_checkpoint(self.ckpt_dir) if load == "auto" else (Path(load) if load else None)
        path = self.task.resume_from(path)
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
            self.task.save_extra(self.ckpt_dir)
        self.hooks.loongforge_on_checkpoint_save(trainer=self, step=self.step, path=str(path))
        return path

    # --- one step --------------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model):
        return self.task.forward_step(next(data_iterator), model)

    def _run_schedule(self, microbatches: list[dict], forward_only: bool) -> tuple[torch.Tensor, list[str]]:
        """Forward (and backward) over ``microbatches``; returns ([summed loss, units, extras...]
        over the world, on the device: read it after the optimizer step is queued, reading syncs
        with the GPU) and the names of the extra logged values."""
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
        extras = self.task.logged_values  # the same on every rank (only the last stage sees the loss dicts)
        # on the device: NCCL reduces only device tensors
        totals = torch.zeros(2 + len(extras), dtype=torch.float64, device=self.rt.backend.device())
        for item in losses or ():
            values = [item["loss_sum"], item["tokens"], *(item[k] for k in extras)]
            totals += torch.stack([v.detach().double().reshape(()).to(totals.device) for v in values])
        # every model-parallel copy of a data-parallel replica adds the same numbers to both sums
        dist.all_reduce(totals)
        return totals, extras

    def _next_global_batch(self) -> list[dict]:
        batches = [next(self.train_batches) for _ in range(self.layout.num_microbatches)]
        self.consumed_samples += self.cfg.train.global_batch_size
        return batches

    def train_step(self) -> dict[str, float]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals, extras = self._run_schedule(self._next_global_batch(), forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()  # grad_norm: a float, a device tensor or None
        self.step += 1
        self.scheduler.step(increment=1)
        loss_sum, units, *extra = totals.tolist()
        return {"loss": loss_sum / max(units, 1), "grad_norm": 0.0 if grad_norm is None else float(grad_norm),
                "skipped": float(not ok), **{k: v / max(units, 1) for k, v in zip(extras, extra, strict=True)},
                **self.task.step_metrics()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.valid_ds is None:
            return {}
        batches = self._batches(self.valid_ds, 0)
        loss_sum = units = 0.0
        for _ in range(self.cfg.train.eval_steps):
            mbs = [next(batches) for _ in range(self.layout.num_microbatches)]
            totals, _ = self._run_schedule(mbs, forward_only=True)
            s, t = totals[:2].tolist()
            loss_sum, units = loss_sum + s, units + t
        for chunk in self.model:
            chunk.train()
        loss = loss_sum / max(units, 1)
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())} if self.task.unit == "tokens" else {"loss": loss}

    # --- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, rt = self.cfg, self.rt
        total = cfg.train.steps
        logger = RunLogger(cfg, total, self.step, enabled=rt.is_main)
        self.hooks.loongforge_on_train_start(trainer=self)
        first_loss = last_loss = None
        peak = rt.backend.peak_flops(cfg.train.precision)
        units_per_step = cfg.train.global_batch_size * self.units_per_sample
        rate_key = "tokens_per_s" if self.task.unit == "tokens" else "samples_per_s"
        stop = signals.StopOnSignal(rt.backend.device(), verbose=rt.is_main).install()  # SIGTERM/SIGINT: save, exit
        try:
            while self.step < total:
                rt.backend.synchronize()
                start = time.perf_counter()
                metrics = self.train_step()
                rt.backend.synchronize()
                elapsed = time.perf_counter() - start
                rate = units_per_step / elapsed
                metrics |= {"lr": self.optimizer.param_groups[0]["lr"], rate_key: rate,
                            "mfu": mfu(rate / rt.world_size, self.flops_unit, peak) if self.flops_unit else None,
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


def _has_wrapped_attr(module, name: str) -> bool:
    while module is not None:
        if hasattr(module, name):
            return True
        module = getattr(module, "module", None)
    return False


def _complete_module_contract(chunks: list, pp: int) -> None:
    """What megatron-core's schedules ask of a model chunk, for a task's own module (a
    ``GPTModel`` has all of it): ``model_type`` (default: encoder-or-decoder) and, without
    pipeline parallelism, a no-op ``set_input_tensor`` on the innermost module (wrappers such as
    ``Float16Module`` forward the call to it). Under pipelining a task's chunk must take the
    previous stage's activations itself, so a missing ``set_input_tensor`` is an error."""
    from loongforge.config import ConfigError

    for chunk in chunks:
        if not _has_wrapped_attr(chunk, "model_type"):
            chunk.model_type = ModelType.encoder_or_decoder
        inner = chunk
        while getattr(inner, "module", None) is not None:
            inner = inner.module
        if not hasattr(inner, "set_input_tensor"):
            if pp > 1:
                raise ConfigError(f"config key 'parallel.pp' = {pp}: the task's model {type(inner).__name__} has no "
                                  "set_input_tensor(tensor), so it cannot run as a pipeline stage")
            inner.set_input_tensor = _no_pipeline_input


def _no_pipeline_input(tensor) -> None:
    """``set_input_tensor`` of a chunk without pipeline parallelism: the schedule passes ``None``."""


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


def train(cfg, plugins, task_cls: type[TrainTask]) -> dict:
    """Train ``cfg`` with ``task_cls`` in this process (one rank of the world torchrun set up)."""
    cfg = task_cls.resolve_config(cfg, plugins)
    with runtime(cfg, plugins) as rt:
        task = task_cls(cfg, rt)
        return task.summarize(Trainer(cfg, rt, task).fit())


def run_pretrain(cfg, plugins) -> dict:
    """Train ``cfg`` as the ``pretrain`` task in this process."""
    from loongforge.trainer.lm import PretrainTask

    return train(cfg, plugins, PretrainTask)


def run(cfg, plugins) -> dict | None:
    """Run the task that ``cfg.task`` names: a trained :class:`TrainTask` or a plain ``run`` callable."""
    record = lookup(plugins.registry().tasks, cfg.task, "task (config key 'task')", plugins.failures)
    if record.task:
        return train(cfg, plugins, load_object(record.task))
    return load_object(record.run)(cfg, plugins)
