"""Throughput of the parallel layouts through `loongforge run`: 1 device vs TP=2 vs DP=2 vs PP=2.

    python bench/parallel_throughput.py                 # Qwen3-1.7B shape, seq 4096, bf16, 2 GPUs
    python bench/parallel_throughput.py --cpu-smoke     # tiny Qwen3 on CPU/gloo: checks the script

Each row is one `loongforge run ... --nproc-per-node N` (the real launcher and trainer) on the same
global batch (8 sequences, micro-batch 1); numbers are medians over the steps after warm-up, read
from the run's metrics.jsonl (written by rank 0): tokens/s per device = tokens/s / N, MFU as the
trainer reports it (per device, FLOPs/token = 6 N + 6 L (heads x head_dim) S), peak memory of
rank 0. The loss column (first and last step) is a sanity check: the runs start from random
weights, which TP and DP draw exactly as one device does, while each pipeline stage initialises only
its own layers from the seed, so PP starts elsewhere. Parity from identical weights
(``model.pretrained``) is what ``packages/loongforge-core/tests/parallel/test_parity.py`` proves.

CPU smoke run (2-core machine under heavy load from other jobs; the numbers only show the script
works): 1 device 132, TP=2 544, DP=2 3,014, PP=2 1,179 tokens/s/device; losses 6.9524 -> 6.8596
for 1 device, TP=2 and DP=2, 6.9420 -> 6.8573 for PP=2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {"1 device": (1, []), "TP=2": (2, ["parallel.tp=2"]), "DP=2": (2, []), "PP=2": (2, ["parallel.pp=2"])}
GPU = {"model": "qwen3_1.7b", "overrides": ["train.seq_length=4096", "train.precision=bf16", "train.steps=12"]}
CPU = {"model": "qwen3_tiny", "overrides": ["train.seq_length=64", "train.steps=6", "model.vocab_size=1024"]}
CONFIG = "defaults:\n  - /models/qwen3@model: {model}\n  - _self_\n"


def run(name: str, nproc: int, overrides: list[str], workdir: Path, warmup: int) -> dict:
    out = workdir / name.replace(" ", "_").replace("=", "")
    cmd = [sys.executable, "-m", "loongforge.cli", "run", str(workdir / "run.yaml"), *overrides,
           f"output_dir={out}", "train.micro_batch_size=1", "train.global_batch_size=8", "train.log_interval=1",
           "train.eval_interval=0", "scheduler.warmup_steps=0", "logging.progress=false",
           "logging.tensorboard=false", "logging.loss_curve=false", "checkpoint.save_final=false",
           "checkpoint.load=null"]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    subprocess.run(cmd, check=True, cwd=workdir)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["split"] == "train"]
    timed = steps[warmup:]
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "layout": name,
        "devices": nproc,
        "tokens/s/device": f"{statistics.median(r['tokens_per_s'] for r in timed) / nproc:,.0f}",
        "MFU": f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a",
        "peak GiB (rank 0)": f"{max(r.get('peak_gib', 0.0) for r in timed):.1f}",
        "loss": f"{steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU backend")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    setup = CPU if args.cpu_smoke else GPU
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "run.yaml").write_text(CONFIG.format(model=setup["model"]))
        rows = [run(name, nproc, [*setup["overrides"], *extra], workdir, args.warmup)
                for name, (nproc, extra) in LAYOUTS.items()]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
