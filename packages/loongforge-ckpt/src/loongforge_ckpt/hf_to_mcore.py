"""``loongforge convert hf-to-mcore HF_DIR OUT_DIR``: an HF safetensors model -> a LoongForge
native checkpoint directory.

Streaming: each parameter of ours is built from its HF tensors (read one by one from the
safetensors files) at the moment the checkpoint writer needs it, written, and dropped; peak memory
is about twice the largest tensor (e.g. an HF tensor plus its padded or fused copy) above the
process's fixed footprint, never the model.

The output (``OUT_DIR``)::

    step_00000000/        megatron-core torch_dist checkpoint of the model (global tensors) +
                          trainer_state.json {"step": 0, "weights_only": true, ...}
    latest                "step_00000000"
    config.yaml           a full run config whose ``model`` section is the HF config.json
    tokenizer/            the HF directory's tokenizer files, when it has them

Tensors are stored whole, so any tensor/pipeline-parallel layout loads the checkpoint
(``--tp``/``--pp`` only check that the model fits that layout and pad the vocabulary for it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from loongforge_ckpt.errors import ConversionError

STEP_NAME = "step_00000000"
#: HF tensors that are derived, never trained: dropped silently
DERIVED_HF = (r".*\.rotary_emb\.inv_freq",)


def _fmt(pattern: str, layer: int | None) -> str:
    return pattern if layer is None else pattern.replace("{i}", str(layer))


def check_layout(provider, section: dict, tp: int, pp: int) -> None:
    """Refuse a TP/PP layout the model cannot be split into, naming the config key."""
    from loongforge.model_provider import RunSettings

    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp {tp} --pp {pp}: both must be >= 1")
    heads = section.get("num_attention_heads")
    kv = section.get("num_key_value_heads") or heads
    layers = section.get("num_hidden_layers")
    for key, value, size, flag in (("num_attention_heads", heads, tp, "--tp"), ("num_key_value_heads", kv, tp, "--tp"),
                                   ("num_hidden_layers", layers, pp, "--pp")):
        if value is not None and int(value) % size:
            raise ConversionError(f"config.json {key}={value} is not divisible by {flag} {size}")
    try:
        provider.transformer_config(RunSettings(tp=tp, pp=pp))
    except ValueError as exc:
        raise ConversionError(f"the model does not fit --tp {tp} --pp {pp}: {exc}") from exc


def _plan_reads(mapping, params: dict, ckpt, tied: bool, allow_unmapped: bool) -> dict[str, list[str]]:
    """Check the HF checkpoint against the model the config describes (names, shapes, dtypes) from
    the file headers alone; return our parameter -> the HF tensors it is made of."""
    import re

    expected = mapping.ours_to_hf(params.__getitem__)  # meta tensors with the HF shapes
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConversionError(f"HF checkpoint {ckpt.path} lacks tensors the config needs: {missing[:10]}{more}")
    for name, meta in expected.items():
        info = ckpt.info(name)
        if tuple(info.shape) != tuple(meta.shape):
            raise ConversionError(f"tensor {name!r} in {info.file} has shape {tuple(info.shape)}, but config.json "
                                  f"describes {tuple(meta.shape)}")
    ignore = list(DERIVED_HF) + (["lm_head\\.weight"] if tied else [])
    extra = [n for n in mapping.unmapped_hf(ckpt.names) if not any(re.fullmatch(p, n) for p in ignore)]
    if extra and not allow_unmapped:
        raise ConversionError(f"HF checkpoint {ckpt.path} has tensors no parameter of the model takes: {extra[:10]}"
                              f"{' ...' if len(extra) > 10 else ''} (pass --allow-unmapped to drop them)")
    reads: dict[str, list[str]] = {}
    for path in params:
        rule, layer = mapping.rule_for(path)
        names = [_fmt(p, layer) for p in rule.hf_patterns()]
        dtypes = {ckpt.info(n).dtype for n in names}
        if len(dtypes) > 1:
            raise ConversionError(f"parameter {path!r} fuses HF tensors of different dtypes: "
                                  + ", ".join(f"{n} ({ckpt.info(n).dtype}, {ckpt.info(n).file.name})" for n in names))
        reads[path] = names
    return reads


def convert_hf_to_mcore(hf_dir, out_dir, *, tp: int = 1, pp: int = 1, force: bool = False,
                        allow_unmapped: bool = False, log=print, plugins=None) -> Path:
    """Convert; returns the step directory written. ``plugins``: the plugin manager whose model
    families are used (default: the process-wide one)."""
    from loongforge.config.compose import validate
    from loongforge.model_provider import RunSettings
    from loongforge.model_section import validate_hf_config
    from omegaconf import OmegaConf

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (an HF model directory is expected)")
    try:
        hf_cfg = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ConversionError(f"{config_file}: not JSON ({exc})") from None
    validate_hf_config(hf_cfg, config_file, plugins)  # torch-free: a config error is one line, before any import
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from loongforge_ckpt import native
    from loongforge_ckpt.safetensors_io import HFCheckpoint

    section = native.section_from_hf_config(hf_cfg, str(config_file), plugins)
    provider = native.provider_for(section, plugins)
    check_layout(provider, section, tp, pp)
    ckpt = HFCheckpoint(hf_dir)
    if (out_dir / native.LATEST).exists() and not force:
        raise ConversionError(f"{out_dir} already holds a checkpoint (pass --force to replace it)")

    final, tmp = out_dir / STEP_NAME, out_dir / (STEP_NAME + ".tmp")
    with native.megatron_session() as backend:
        # one chunk with every layer, vocabulary padded as a run with tensor-parallel size tp pads it
        run = RunSettings(make_vocab_size_divisible_by=RunSettings().make_vocab_size_divisible_by * tp)
        model = native.meta_model(provider, run, backend)
        params = dict(model.named_parameters())
        mapping = native.weight_mapping(provider, model)
        tied = bool(section.get("tie_word_embeddings", False))
        reads = _plan_reads(mapping, params, ckpt, tied, allow_unmapped)

        sharded = model.sharded_state_dict()
        key_dtypes: dict[str, tuple[torch.dtype, str]] = {}
        for path, value in sharded.items():
            if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
                continue
            if path not in reads:
                raise ConversionError(f"internal: state-dict entry {path!r} is not a parameter the weight mapping knows")
            dtype = ckpt.info(reads[path][0]).dtype
            seen = key_dtypes.setdefault(value.key, (dtype, reads[path][0]))
            if seen[0] != dtype:
                raise ConversionError(f"HF tensors {seen[1]!r} ({seen[0]}) and {reads[path][0]!r} ({dtype}) are stored "
                                      "in one checkpoint tensor (the layers of one parameter) but differ in dtype")
            value.data = torch.empty(tuple(value.data.shape), dtype=dtype, device="meta")
            if isinstance(value, ShardedTensor):
                value.dtype = dtype

        stats = {"tensors": 0, "bytes": 0, "largest": 0}

        def produce(path: str) -> torch.Tensor:
            rule, layer = mapping.rule_for(path)
            hf = {p: ckpt.read(_fmt(p, layer)) for p in rule.hf_patterns()}
            full = rule.combine(hf, path, layer)
            del hf
            if tuple(full.shape) != tuple(params[path].shape):
                raise ConversionError(f"parameter {path!r} from {reads[path]} has shape {tuple(full.shape)}, "
                                      f"the model expects {tuple(params[path].shape)}")
            full = full.contiguous()
            if full.untyped_storage().nbytes() != full.nbytes:
                full = full.clone()
            stats["tensors"] += 1
            stats["bytes"] += full.nbytes
            stats["largest"] = max(stats["largest"], full.nbytes)
            return full

        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        native.write_checkpoint(sharded, tmp, produce)

    native.write_json(tmp / native.TRAINER_STATE, {
        "step": 0, "consumed_samples": 0, "scheduler": None, "weights_only": True,
        "converted_from": str(hf_dir.resolve()), "converter": "hf-to-mcore",
    })
    tokenizer = native.copy_tokenizer(hf_dir, out_dir / native.TOKENIZER_DIR)
    run_cfg = {"model": section, "parallel": {"tp": tp, "pp": pp}}
    if tokenizer:
        run_cfg["tokenizer"] = {"path": str((out_dir / native.TOKENIZER_DIR).resolve())}
    else:
        log(f"note: {hf_dir} has no tokenizer files; config.yaml keeps the default tokenizer.path")
    native.atomic_write_text(out_dir / native.CONFIG_FILE, OmegaConf.to_yaml(validate(OmegaConf.create(run_cfg))))
    if final.exists():  # --force: no `latest` while the old checkpoint is replaced
        (out_dir / native.LATEST).unlink(missing_ok=True)
        shutil.rmtree(final)
    tmp.rename(final)
    native.atomic_write_text(out_dir / native.LATEST, final.name)
    log(f"wrote {final}: {stats['tensors']} parameters, {stats['bytes'] / 2**20:.1f} MiB "
        f"(largest {stats['largest'] / 2**20:.1f} MiB) from {hf_dir}")
    log(f"load it with: loongforge run ... checkpoint.load={final} checkpoint.weights_only=true "
        "(any parallel.tp/pp the model divides into)")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loongforge convert hf-to-mcore",
        description="Convert an HF safetensors model directory into a LoongForge native (megatron-core "
                    "distributed) checkpoint, streaming tensor by tensor.")
    parser.add_argument("hf_dir", help="HF model directory (config.json + *.safetensors [+ tokenizer files])")
    parser.add_argument("out_dir", help="output checkpoints directory (gets step_00000000/, latest, config.yaml, tokenizer/)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against and pad "
                        "the vocabulary for (any layout loads the checkpoint)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against")
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT_DIR")
    parser.add_argument("--allow-unmapped", action="store_true",
                        help="drop HF tensors the model has no parameter for instead of failing")
    args = parser.parse_args(argv)
    from loongforge.errors import LoongForgeError

    try:
        convert_hf_to_mcore(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, force=args.force,
                            allow_unmapped=args.allow_unmapped)
    except LoongForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
