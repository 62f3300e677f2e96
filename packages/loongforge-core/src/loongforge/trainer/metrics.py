"""Throughput, MFU and the console/TensorBoard/PNG outputs of a run.

MFU = (tokens/s per device x model FLOPs per token) / the device's dense peak FLOP/s, with
model FLOPs per token = 6 x N + 6 x L x (heads x head_dim) x S, where N counts the parameters
that take part in matrix products (all transformer layers plus the output layer, not the input
embedding lookup), L the layers and S the sequence length (causal attention: half of the S x S
scores, forward and backward).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def matmul_parameters(config, vocab_size: int) -> int:
    """N in the MFU formula, from a megatron-core TransformerConfig."""
    h, d = config.hidden_size, config.kv_channels
    q, kv = config.num_attention_heads * d, config.num_query_groups * d
    ffn = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    per_layer = h * (q + 2 * kv) + q * h + h * ffn + config.ffn_hidden_size * h
    return config.num_layers * per_layer + vocab_size * h


def flops_per_token(config, vocab_size: int, seq_length: int) -> float:
    attention = 6 * config.num_layers * config.num_attention_heads * config.kv_channels * seq_length
    return 6 * matmul_parameters(config, vocab_size) + attention


def mfu(tokens_per_s_per_device: float, flops_token: float, peak_flops: float | None) -> float | None:
    if not peak_flops:
        return None
    return tokens_per_s_per_device * flops_token / peak_flops


class RunLogger:
    """Console progress bar (rich), TensorBoard scalars and the loss history (main rank only)."""

    def __init__(self, cfg, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.history: list[tuple[int, float]] = []
        self.tb = self.jsonl = None
        self.progress = None
        if not enabled:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # one JSON object per step, full precision: for scripts, tests and resumed-run comparisons
        self.jsonl = open(out / "metrics.jsonl", "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        self.total = total_steps
        # a progress bar only on a terminal; redirected output gets one plain line per log interval
        if cfg.logging.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if "loss" in metrics:
            self.history.append((step, metrics["loss"]))
        self._write({"step": step, "split": "train", **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=_format(metrics))
        else:
            print(step_line(step, self.total, metrics), flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "split": "valid", **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"valid/{key}", value, step)
            self.tb.flush()
        self.print(f"eval at step {step}: " + _format(metrics))

    def _write(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()

    def save_loss_curve(self, path: Path) -> Path | None:
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, losses = zip(*self.history, strict=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, losses)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


#: the fields of a plain progress line, in order, with their labels
LINE_FIELDS = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad norm {:.3f}"),
               ("tokens_per_s", "{:,.0f} tok/s"), ("samples_per_s", "{:,.2f} samples/s"), ("mfu", "MFU {:.1%}"))


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """``step 10/300 | loss 4.1234 | lr 3.00e-04 | grad norm 1.234 | 8,772 tok/s | MFU 41.2%``
    (MFU only where the backend knows its peak FLOP/s; skipped steps and peak memory appended)."""
    parts = [f"step {step}/{total}"]
    parts += [fmt.format(metrics[key]) for key, fmt in LINE_FIELDS if metrics.get(key) is not None]
    if metrics.get("skipped"):
        parts.append("skipped (inf/nan gradients)")
    if metrics.get("peak_gib") is not None:
        parts.append(f"peak {metrics['peak_gib']:.2f} GiB")
    return " | ".join(parts)


def _format(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key == "lr":
            parts.append(f"lr {value:.2e}")
        elif key == "mfu":
            parts.append(f"MFU {100 * value:.1f}%")
        elif key == "tokens_per_s":
            parts.append(f"{value:,.0f} tok/s")
        elif key == "samples_per_s":
            parts.append(f"{value:,.2f} samples/s")
        elif key.endswith("_gib"):
            parts.append(f"{key[:-4]} {value:.2f} GiB")
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)
