"""Export a LoRA run as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained`` loads onto the HF model, or as merged HF weights.

Names come from the model family's weight mapping: each adapted linear's ``lora_B`` is split like
its weight (fused ``linear_qkv`` -> ``q_proj``/``k_proj``/``v_proj`` rows, fused ``linear_fc1`` ->
``gate_proj``/``up_proj``) and every part gets its own copy of the shared ``lora_A``, which is the
same map: ``[Bq; Bk; Bv] A x`` is ``Bq A x``, ``Bk A x`` and ``Bv A x``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loongforge.errors import LoongForgeError
from loongforge.peft.lora import lora_modules, merged_state

PEFT_PREFIX = "base_model.model."


def adapter_tensors(model: torch.nn.Module, mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT-named adapter tensors of a whole (TP=1, PP=1) adapted model, and the HF target module
    names (``q_proj``...)."""
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, m in lora_modules(model).items():
        weight_name = f"{name}.weight"
        rule, layer = mapping.rule_for(weight_name)
        parts = rule.split(m.lora_B.detach(), weight_name)
        for pattern, b in parts.items():
            hf = pattern if layer is None else pattern.replace("{i}", str(layer))
            if not hf.endswith(".weight"):
                raise LoongForgeError(f"{name}: the weight mapping gives HF tensor {hf!r}, not a "
                                      "'<module>.weight', so the adapter cannot be named for PEFT")
            module = hf[: -len(".weight")]
            targets.add(module.rsplit(".", 1)[-1])
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = m.lora_A.detach().float().clone().contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.float().clone().contiguous()
    return tensors, sorted(targets)


def save_adapter(model: torch.nn.Module, mapping, out_dir: str | Path, *, rank: int, alpha: float,
                 dropout: float = 0.0, base_model: str | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, targets = adapter_tensors(model, mapping)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_merged(model: torch.nn.Module, provider, out_dir: str | Path) -> Path:
    """HF ``model.safetensors`` + ``config.json`` of the model with its adapters merged."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = merged_state(model)
    hf = provider.weight_mapping().matching(state).ours_to_hf(state.__getitem__)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(provider.hf_config(), indent=2) + "\n")
    return out


def export_lora(checkpoint: str, out_dir: str, merge: bool = False) -> Path:
    """``loongforge export-lora CKPT OUT [--merge]``: load a LoRA run's checkpoint in one process
    (TP=1, PP=1, resharded on load) and write the adapter (or merged HF weights + tokenizer)."""
    from omegaconf import OmegaConf

    from loongforge.generate import _resolve
    from loongforge.peft.lora import apply_lora_config
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import load_checkpoint
    from loongforge.trainer.model import build_model_chunks, model_provider, run_settings
    from loongforge.trainer.runtime import runtime

    root, step_dir = _resolve(checkpoint)
    cfg = OmegaConf.load(root / "config.yaml")
    lora = cfg.get("peft", {}).get("lora", {})
    if not lora or int(lora.get("rank", 0)) < 1:
        raise LoongForgeError(f"{root}/config.yaml: this run has no LoRA adapters (peft.lora.rank is 0)")
    from loongforge.parallel import single_process_layout

    cfg.parallel = single_process_layout()
    cfg.train.precision = "fp32"
    # the saved model section is already resolved and the checkpoint holds the base weights too:
    # the HF base directory is only named in the adapter config, it need not exist any more
    base_model = cfg.model.pop("pretrained", None)
    plugins = get_plugin_manager()
    with runtime(cfg, plugins) as rt:
        provider = model_provider(cfg, plugins)
        chunks = build_model_chunks(provider, run_settings(cfg), rt.backend, plugins)
        apply_lora_config(chunks, cfg)
        load_checkpoint(step_dir, chunks, None, rt.backend, load_rng=False)
        model = chunks[0].eval()
        if merge:
            out = save_merged(model, provider, out_dir)
            tok = root / "tokenizer"
            if tok.is_dir():
                import shutil

                shutil.copytree(tok, Path(out_dir), dirs_exist_ok=True)  # HF layout: tokenizer files beside the weights
            return out
        names = [n for n, _ in model.named_parameters()]
        return save_adapter(model, provider.weight_mapping().matching(names), out_dir, rank=lora.rank,
                            alpha=lora.alpha, dropout=lora.dropout, base_model=base_model)
