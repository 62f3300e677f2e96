"""Smoke test of one installed package, run by the Python of a clean venv that holds only that
package's wheel, its declared dependencies and the core (``scripts/release.py`` builds it).

    python scripts/smoke.py loongforge-models-llm [--workdir DIR]

- loongforge-core: ``loongforge --version``, ``loongforge plugins`` lists only the core, and
  ``loongforge run`` says which package to install (no Hydra error, no traceback);
- loongforge-models-llm: a 2-step ``loongforge run`` of the embedded default that saves a checkpoint;
- loongforge-ckpt: a tiny random Llama (transformers, safetensors) through ``loongforge convert
  hf-to-mcore`` and ``mcore-to-hf``; the tensors come back bit-identical;
- loongforge-models-vlm: a 2-step ``loongforge run qwen2_5_vl_tiny``;
- the others: the module imports and ``loongforge plugins`` lists the plugin, refusing none.

Exit status 0 when it passed; the failing command's output otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: distribution -> (module, entry-point name)
PACKAGES = {
    "loongforge-core": ("loongforge", "core"),
    "loongforge-models-llm": ("loongforge_llm", "llm"),
    "loongforge-models-vlm": ("loongforge_vlm", "vlm"),
    "loongforge-diffusion": ("loongforge_diffusion", "diffusion"),
    "loongforge-embodied": ("loongforge_embodied", "embodied"),
    "loongforge-backend-cuda": ("loongforge_cuda", "cuda"),
    "loongforge-backend-xpu": ("loongforge_xpu", "xpu"),
    "loongforge-kernels": ("loongforge_kernels", "kernels"),
    "loongforge-ckpt": ("loongforge_ckpt", "ckpt"),
}
#: workspace packages a smoke test needs besides the package's own dependencies
SMOKE_NEEDS = {"loongforge-ckpt": ("loongforge-models-llm",)}
#: a 2-step run that saves its checkpoint at step 2, without evaluation or a long warm-up
SHORT_RUN = ["train.steps=2", "train.eval_interval=0", "checkpoint.save_interval=2", "scheduler.warmup_steps=1",
             "output_dir=out"]


class SmokeFailure(Exception):
    pass


def loongforge(*args: str, cwd: Path, expect: int | None = 0) -> subprocess.CompletedProcess:
    """The venv's ``loongforge`` console script (it sits next to this Python)."""
    exe = Path(sys.executable).parent / "loongforge"
    result = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if expect is not None and result.returncode != expect:
        raise SmokeFailure(f"`loongforge {' '.join(args)}` exited {result.returncode} (expected {expect})\n"
                           f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def plugins_lists(name: str, cwd: Path) -> str:
    out = loongforge("plugins", cwd=cwd).stdout
    check(any(line.split("│")[1:2] and line.split("│")[1].strip() == name for line in out.splitlines()),
          f"`loongforge plugins` does not list {name!r}:\n{out}")
    return out


def smoke_core(cwd: Path) -> None:
    from importlib.metadata import version

    out = loongforge("--version", cwd=cwd).stdout
    check(version("loongforge-core") in out, f"--version printed {out!r}")
    plugins_lists("core", cwd)
    run = loongforge("run", cwd=cwd, expect=None)
    check(run.returncode != 0, "`loongforge run` with the core alone succeeded")
    check("loongforge-models-llm" in run.stderr and "pip install" in run.stderr and "Traceback" not in run.stderr,
          f"`loongforge run` with the core alone does not say what to install:\n{run.stderr[-3000:]}")


def smoke_llm(cwd: Path) -> None:
    plugins_lists("llm", cwd)
    loongforge("run", *SHORT_RUN, cwd=cwd)
    step = cwd / "out" / "checkpoints" / "step_00000002"
    check((step / "trainer_state.json").is_file(), f"no complete checkpoint at {step}")


def smoke_vlm(cwd: Path) -> None:
    plugins_lists("vlm", cwd)
    loongforge("run", "qwen2_5_vl_tiny", *SHORT_RUN, cwd=cwd)
    check(any((cwd / "out").rglob("trainer_state.json")), "the VLM run saved no checkpoint")


def smoke_ckpt(cwd: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file

    plugins_lists("ckpt", cwd)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(cwd / "hf", safe_serialization=True)
    from loongforge.cli import main as cli  # the CLI in this process: torch and megatron import once

    for args in (["hf-to-mcore", cwd / "hf", cwd / "mcore"], ["mcore-to-hf", cwd / "mcore", cwd / "back"]):
        check(cli(["convert", *map(str, args)]) == 0, f"`loongforge convert {args[0]}` failed")

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    before, after = tensors(cwd / "hf"), tensors(cwd / "back")
    check(set(before) == set(after), f"tensor names differ: {sorted(set(before) ^ set(after))}")
    bad = [k for k in before if not torch.equal(before[k], after[k])]
    check(not bad, f"tensors changed in the round trip: {bad}")


def smoke_plugin(package: str, cwd: Path) -> None:
    import importlib

    module, name = PACKAGES[package]
    importlib.import_module(module)
    plugins_lists(name, cwd)


SMOKES = {"loongforge-core": smoke_core, "loongforge-models-llm": smoke_llm, "loongforge-models-vlm": smoke_vlm,
          "loongforge-ckpt": smoke_ckpt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", choices=sorted(PACKAGES))
    parser.add_argument("--workdir", type=Path, help="where runs write (default: a temporary directory)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loongforge-smoke-") as tmp:
        cwd = args.workdir or Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        try:
            smoke = SMOKES.get(args.package)
            smoke(cwd) if smoke else smoke_plugin(args.package, cwd)
        except SmokeFailure as exc:
            print(f"SMOKE FAILED {args.package}: {exc}", file=sys.stderr)
            return 1
    print(f"smoke ok: {args.package} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
