"""Per-step MoE metrics: the routers' auxiliary losses, expert load imbalance and dropped tokens.

* ``moe_aux_loss`` / ``moe_z_loss``: megatron-core's routers record each MoE layer's
  load-balancing loss (and z-loss) without its coefficient in ``get_moe_metrics_tracker()``; its
  ``report`` reduces them over the pipeline, tensor/context and data-parallel groups, averages
  over micro-batches and MoE layers, and clears them for the next step.
* ``moe_load_imbalance``: for each MoE layer, the most tokens any expert received divided by the
  mean over experts, over the whole global batch (all ranks); the mean over MoE layers
  (``moe_load_imbalance_max``: the worst layer). 1.0 is perfect balance.
* ``moe_dropped_frac``: the fraction of the tokens x top-k assignments that the capacity limit
  dropped (0 when dropless).

Token counts come from forward hooks on the routers (their ``routing_map`` output, after the
capacity limit), during training forwards only. :meth:`MoEStepMetrics.collect` is a collective:
every rank calls it once per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MoEStepMetrics:
    def __init__(self, chunks, config, num_microbatches: int):
        from megatron.core.transformer.moe.router import TopKRouter

        self.config, self.num_microbatches = config, num_microbatches
        layers = config.num_layers
        self.counts = torch.zeros(layers, config.num_moe_experts, dtype=torch.float64)
        self.assigned = torch.zeros(layers, dtype=torch.float64)
        self._handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self._handles.append(module.register_forward_hook(self._record))

    def _record(self, router, inputs, outputs) -> None:
        if not router.training:
            return
        _, routing_map = outputs
        layer = router.layer_number - 1
        self.counts[layer] += routing_map.sum(dim=0).to(self.counts)
        self.assigned[layer] += routing_map.shape[0] * router.topk

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect(self, step: int) -> dict[str, float]:
        """This step's metrics (equal on every rank); resets the counters."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        names = ["load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss"]
        tracker = get_moe_metrics_tracker()
        present = [n for n in names if n in tracker.metrics]
        # every pipeline stage must reduce the same names (stages without MoE layers recorded none)
        flags = torch.tensor([float(n in present) for n in names], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        present = [n for n, f in zip(names, flags.tolist(), strict=True) if f]
        if present:
            tracker.report(loss_scale=1.0 / self.num_microbatches, iteration=step, force_initialize=True,
                           track_names=present, num_layers=cfg.num_layers, moe_layer_freq=cfg.moe_layer_freq,
                           total_loss_dict=losses)
        counts, assigned = self.counts.clone(), self.assigned.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(assigned)
        self.counts.zero_()
        self.assigned.zero_()
        out: dict[str, float] = {}
        aux = [float(v) for n, v in losses.items() if n.endswith("load_balancing_loss")]
        if aux:
            out["moe_aux_loss"] = sum(aux)
        if "z_loss" in losses:
            out["moe_z_loss"] = float(losses["z_loss"])
        moe = assigned > 0
        if moe.any():
            per_layer = counts[moe].max(dim=1).values / counts[moe].mean(dim=1).clamp_min(1e-12)
            out["moe_load_imbalance"] = float(per_layer.mean())
            out["moe_load_imbalance_max"] = float(per_layer.max())
            out["moe_dropped_frac"] = float(1 - counts[moe].sum() / assigned[moe].sum())
        return out


# --- trainer lifecycle (the plugin's loongforge_on_train_start / loongforge_on_step_end) ---------

_ACTIVE: dict[int, tuple[object, MoEStepMetrics]] = {}


def on_train_start(trainer) -> None:
    """Hook the routers of an MoE model (no-op for dense models)."""
    config = getattr(trainer, "config", None)
    if not getattr(config, "num_moe_experts", None):
        return
    _ACTIVE[id(trainer)] = (trainer, MoEStepMetrics(trainer.model, config, trainer.layout.num_microbatches))


def on_step_end(trainer, step: int, metrics: dict) -> None:
    """Add this step's MoE metrics to ``metrics`` and, on the main rank at the log interval, print
    them and append them to ``<output_dir>/moe_metrics.jsonl``."""
    entry = _ACTIVE.get(id(trainer))
    if entry is None:
        return
    moe = entry[1].collect(step)
    metrics.update(moe)
    cfg = trainer.cfg
    total = cfg.train.steps
    if moe and trainer.rt.is_main and (step % cfg.train.log_interval == 0 or step == total):
        import json
        from pathlib import Path

        print(f"moe step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in moe.items()), flush=True)
        path = Path(cfg.output_dir) / "moe_metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **moe}) + "\n")
    if step >= total:
        entry[1].remove()
        _ACTIVE.pop(id(trainer), None)
