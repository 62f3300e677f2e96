"""``loongforge convert mcore-to-hf CKPT_DIR OUT_DIR``: a LoongForge native checkpoint (saved
under any TP/PP layout) -> an HF model directory.

``CKPT_DIR`` is a run's checkpoints directory (its ``latest`` checkpoint is converted) or one
``step_N`` directory in it; the model comes from ``config.yaml`` next to the step directories.
Parameters are read one decoder layer at a time as full (TP=1) tensors, split into HF tensors and
written straight into their place in the output shards, so memory holds about one layer whatever
``--max-shard-size`` is. The output is written into a temporary sibling directory and renamed
into place when complete: ``config.json`` (the family's ``hf_config()``, ``torch_dtype`` = the
stored dtype), ``model.safetensors`` or ``model-0000K-of-0000N.safetensors`` +
``model.safetensors.index.json``, and the tokenizer files from ``CKPT_ROOT/tokenizer/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from loongforge_ckpt.errors import ConversionError

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _fmt(pattern: str, layer: int | None) -> str:
    return pattern if layer is None else pattern.replace("{i}", str(layer))


def convert_mcore_to_hf(checkpoint, out_dir, *, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                        force: bool = False, log=print, plugins=None) -> Path:
    """Convert; returns ``out_dir``. ``plugins``: the plugin manager whose model families are
    used (default: the process-wide one)."""
    import torch
    from loongforge.model_provider import RunSettings
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from omegaconf import OmegaConf

    from loongforge_ckpt import native
    from loongforge_ckpt.safetensors_io import ShardedSafetensorsWriter, parse_size

    root, step = native.resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConversionError(f"{out_dir} exists and is not empty (pass --force to replace it)")
    cfg = OmegaConf.load(root / native.CONFIG_FILE)
    if "model" not in cfg:
        raise ConversionError(f"{root / native.CONFIG_FILE} has no model section")
    section = OmegaConf.to_container(cfg.model, resolve=True)
    provider = native.provider_for(section, plugins)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with native.megatron_session() as backend:
            run = RunSettings()
            model = native.meta_model(provider, run, backend)
            mapping = native.weight_mapping(provider, model)
            sharded = model.sharded_state_dict()
            dtypes = native.stored_dtypes(step)
            paths = [p for p, v in sharded.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))]
            for p in paths:
                if sharded[p].key not in dtypes:
                    raise ConversionError(f"{step}: the checkpoint has no tensor {sharded[p].key!r} (parameter {p!r}); "
                                          f"was it saved from the model in {root / native.CONFIG_FILE}?")

            # the HF tensors, their dtypes and shapes, in file order, from meta tensors
            plan, dtype_bytes = [], Counter()
            for path in paths:
                rule, layer = mapping.rule_for(path)
                if not rule.exported():
                    continue
                meta = torch.empty(tuple(sharded[path].data.shape), dtype=dtypes[sharded[path].key], device="meta")
                for pattern, t in rule.split(meta, path).items():
                    plan.append((_fmt(pattern, layer), t.dtype, tuple(t.shape)))
                    dtype_bytes[t.dtype] += t.numel() * t.element_size()
            writer = ShardedSafetensorsWriter(tmp, plan, max_bytes)
            try:
                for _, group in native.group_by_layer(paths):
                    loaded = native.load_full_tensors({p: sharded[p] for p in group}, step, dtypes)
                    for path in group:
                        rule, layer = mapping.rule_for(path)
                        if rule.exported():
                            for pattern, t in rule.split(loaded[path], path).items():
                                writer.write(_fmt(pattern, layer), t)
                    del loaded
                files = writer.close()
            except BaseException:
                writer.abort()
                raise

        hf_config = dict(provider.hf_config())
        if dtype_bytes:
            stored = str(dtype_bytes.most_common(1)[0][0]).removeprefix("torch.")
            # newer transformers write "dtype"; one carried over from the source config must agree
            hf_config.update({k: stored for k in ("torch_dtype", "dtype") if k == "torch_dtype" or k in hf_config})
        native.write_json(tmp / "config.json", hf_config)
        tokenizer = native.copy_tokenizer(root / native.TOKENIZER_DIR, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}: {len(plan)} tensors in {len([f for f in files if f.suffix == '.safetensors'])} file(s), "
        f"{writer.total_bytes / 2**20:.1f} MiB, from {step}"
        + ("" if tokenizer else f" (no tokenizer files in {root / native.TOKENIZER_DIR})"))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loongforge convert mcore-to-hf",
        description="Convert a LoongForge native checkpoint (any TP/PP layout) into an HF safetensors model directory.")
    parser.add_argument("checkpoint", help="a run's checkpoints directory (its latest checkpoint) or a step_N directory")
    parser.add_argument("out_dir", help="HF model directory to write")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors file, e.g. 2GB, 500MB (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    from loongforge.errors import LoongForgeError

    try:
        convert_mcore_to_hf(args.checkpoint, args.out_dir, max_shard_size=args.max_shard_size, force=args.force)
    except LoongForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
