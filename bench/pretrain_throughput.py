"""Tokens/s, MFU and peak memory of `loongforge run` (the real trainer), printed as a table.

    python bench/pretrain_throughput.py                 # the embedded default on this machine
    python bench/pretrain_throughput.py --gpu           # + Qwen3-0.6B shape, seq 4096, bf16 (one GPU)

Each row is one `loongforge run` subprocess; numbers are medians over the steps after warm-up,
read from the run's metrics.jsonl. MFU = tokens/s/device x FLOPs/token / peak FLOP/s with
FLOPs/token = 6 N + 6 L (heads x head_dim) S (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROWS = {
    "default (qwen3_demo, seq 128)": ["train.steps=40", "train.log_interval=1", "train.eval_interval=0"],
    "qwen3_0.6b seq 4096 bf16 mbs 2": [
        "train.steps=15", "train.log_interval=1",
        "train.eval_interval=0", "train.seq_length=4096", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.precision=bf16", "checkpoint.save_final=false",
    ],
}
QWEN3_06B = "defaults:\n  - /models/qwen3@model: qwen3_0.6b\n  - _self_\n"


def run(name: str, overrides: list[str], workdir: Path, warmup: int) -> dict:
    config = []
    if "0.6b" in name:
        (workdir / "qwen3_06b.yaml").write_text(QWEN3_06B)
        config = [str(workdir / "qwen3_06b.yaml")]
    out = workdir / name.split()[0]
    cmd = [sys.executable, "-m", "loongforge.cli", "run", *config, *overrides, f"output_dir={out}",
           "logging.progress=false", "logging.tensorboard=false", "checkpoint.load=null"]
    subprocess.run(cmd, check=True, cwd=workdir)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["split"] == "train"][warmup:]
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {
        "name": name,
        "tokens/s": statistics.median(r["tokens_per_s"] for r in steps),
        "MFU": f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a (no peak FLOP/s on CPU)",
        "peak GiB": max(r.get("peak_gib", 0.0) for r in steps),
        "loss": f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true", help="also run the Qwen3-0.6B row (needs a GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    rows = [name for name in ROWS if args.gpu or "0.6b" not in name]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(name, ROWS[name], Path(tmp), args.warmup) for name in rows]
    print(f"\n{'run':34} {'tokens/s':>10} {'MFU':>8} {'peak GiB':>9}  loss")
    for r in results:
        print(f"{r['name']:34} {r['tokens/s']:>10,.0f} {r['MFU']:>8} {r['peak GiB']:>9.2f}  {r['loss']}")


if __name__ == "__main__":
    main()
