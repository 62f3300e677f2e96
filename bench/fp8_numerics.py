"""FP8 vs bf16 training numerics: the same model, data and seed trained twice through the real
trainer (``loongforge run``), once in bf16 and once with ``precision.fp8.recipe=RECIPE``; both loss
curves overlaid in one PNG and the relative loss gap at the end printed (mean of the last
``--tail`` steps: (fp8 - bf16) / bf16).

    python bench/fp8_numerics.py --out /tmp/fp8num                       # Llama-3.2-1B shape, blockwise, 300 steps
    python bench/fp8_numerics.py --recipes tensorwise,rowwise,blockwise --steps 300
    python bench/fp8_numerics.py --device cpu --model llama3/llama3_tiny --seq 32 --mbs 2 --steps 3 \
        --override model.vocab_size=1024                                  # smoke

Data: the shipped tiny-stories corpus and tokenizer (``builtin:tiny_stories``), so the loss falls.
On CPU the FP8 runs are refused by the trainer (naming ``precision.fp8.recipe``): the smoke run
checks the plumbing, the bf16 curve and that refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """\
defaults:
  - /models/{family}@model: {name}
  - _self_
seed: {seed}
tokenizer: {{path: "builtin:tiny_stories"}}
data: {{paths: ["builtin:tiny_stories"]}}
train: {{steps: {steps}, seq_length: {seq}, micro_batch_size: {mbs}, global_batch_size: {mbs}, precision: bf16,
        log_interval: 1}}
optimizer: {{lr: {lr}, min_lr: {min_lr}, weight_decay: 0.1}}
scheduler: {{type: cosine, warmup_steps: {warmup}}}
checkpoint: {{save_final: false, load: null}}
logging: {{progress: false, tensorboard: false, loss_curve: false}}
"""


def run(config: Path, out: Path, overrides: list[str], env: dict, timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "loongforge.cli", "run", str(config), f"output_dir={out}", *overrides]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:.0f} s\n{(exc.stdout or '')[-2000:]}"
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    print(f"  {' '.join(overrides) or 'bf16'}: exit {proc.returncode} in {time.time() - start:.0f} s", flush=True)
    return proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(out: Path) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3/llama3.2_1b")
    p.add_argument("--recipes", default="blockwise", help="comma-separated FP8 recipes, each a run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tail", type=int, default=20, help="steps averaged for the final gap")
    p.add_argument("--out", default="outputs/fp8_numerics")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--override", action="append", default=[], help="extra config overrides for every run")
    args = p.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    family, name = args.model.split("/")
    config = out / "run.yaml"
    config.write_text(CONFIG.format(family=family, name=name, seed=args.seed, steps=args.steps, seq=args.seq,
                                    mbs=args.mbs, lr=args.lr, min_lr=args.lr / 10,
                                    warmup=max(1, min(30, args.steps // 10))))
    env = {**os.environ}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    curves, failures = {}, {}
    for label in ["bf16", *[r for r in args.recipes.split(",") if r]]:
        run_dir = out / label
        overrides = [*args.override, *([] if label == "bf16" else [f"precision.fp8.recipe={label}"])]
        code, tail = run(config, run_dir, overrides, env, args.timeout)
        if code != 0:
            failures[label] = tail.strip().splitlines()[-1] if tail.strip() else f"exit {code}"
            print(f"  {label} FAILED: {failures[label]}", flush=True)
        curves[label] = losses(run_dir)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{args.model}: FP8 vs bf16, seq {args.seq}, micro-batch {args.mbs}, seed {args.seed}")
    if any(curves.values()):
        ax.legend()
    png = out / "fp8_vs_bf16_loss.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"\nloss curves: {png}")

    base = curves.get("bf16") or []
    tail = lambda c: sum(v for _, v in c[-args.tail:]) / max(1, len(c[-args.tail:]))  # noqa: E731
    print(f"{'run':12} {'steps':>5} {'first':>8} {'last-' + str(args.tail) + ' mean':>14} {'gap vs bf16':>12}")
    for label, curve in curves.items():
        if not curve:
            print(f"{label:12} no steps ({failures.get(label, 'no metrics')})")
            continue
        gap = (tail(curve) - tail(base)) / tail(base) if base and label != "bf16" else 0.0
        print(f"{label:12} {len(curve):>5} {curve[0][1]:>8.4f} {tail(curve):>14.4f} {100 * gap:>11.2f}%")
    (out / "summary.json").write_text(json.dumps({"curves": curves, "failures": failures}, indent=1))
    return 0 if "bf16" not in failures else 1


if __name__ == "__main__":
    sys.exit(main())
