"""Shared fixtures: tiny random HF models of the shipped test configs, and their conversions.

Conversions run in this process (the converters set up a one-process gloo world themselves);
each model is built, saved and converted once per session.
"""

from __future__ import annotations

from pathlib import Path

import loongforge_llm
import pytest

CONFIGS = Path(loongforge_llm.__file__).parent / "configs" / "models"
#: (config group, tiny config) of every supported family layout
FAMILIES = {
    "llama2_tiny": "llama2",  # MHA, untied
    "llama3_tiny": "llama3",  # GQA, tied, llama3 RoPE scaling
    "qwen1.5_tiny": "qwen1_5",  # MHA + q/k/v bias, untied
    "qwen2_tiny": "qwen2",  # GQA + q/k/v bias, tied
    "qwen2.5_tiny": "qwen2_5",  # one KV head + q/k/v bias, untied
    "qwen3_tiny": "qwen3",  # QK-norm, head_dim != hidden/heads, tied
}
SEQ = 24
#: small enough that every model is split into several safetensors files
SHARD_SIZE = "48KB"


def hf_model(name: str, seed: int = 0):
    """The transformers model of a shipped tiny config, fp32, eager attention, random weights
    (norms around 1, everything else small and non-zero)."""
    import torch
    import transformers
    from loongforge_llm.provider import LLMProvider
    from omegaconf import OmegaConf

    provider = LLMProvider(OmegaConf.load(CONFIGS / FAMILIES[name] / f"{name}.yaml"))
    cfg = dict(provider.hf_config())
    cfg["torch_dtype"] = "float32"
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.05 * torch.randn_like(p))
    return model.eval()


def reference_ids(vocab: int):
    import torch

    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """``converted(name)`` -> dict(hf=HF dir, ckpt=native checkpoints dir, back=HF dir converted
    back, model=the transformers model, ids=token ids, logits=its fp32 logits)."""
    import torch
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf
    from safetensors.torch import save_file

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            base = tmp_path_factory.mktemp(name.replace(".", "_"))
            model = hf_model(name, seed=len(cache))
            model.save_pretrained(base / "hf", safe_serialization=True)
            ids = reference_ids(model.config.vocab_size)
            with torch.no_grad():
                logits = model(ids).logits.contiguous()
            save_file({"ids": ids, "logits": logits}, str(base / "reference.safetensors"))
            convert_hf_to_mcore(base / "hf", base / "ckpt", log=lambda *_: None)
            convert_mcore_to_hf(base / "ckpt", base / "back", max_shard_size=SHARD_SIZE, log=lambda *_: None)
            cache[name] = {"hf": base / "hf", "ckpt": base / "ckpt", "back": base / "back", "model": model,
                           "ids": ids, "logits": logits, "reference": base / "reference.safetensors", "base": base}
        return cache[name]

    return get


def _our_logits(ckpt_root: Path, ids, step_dir: Path | None = None, plugins=None):
    """(logits, vocab_size) of our GPTModel built and loaded from a native checkpoint
    (``step_dir``, default: the root's ``latest``) by the trainer's own code, at TP=PP=1."""
    import torch
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from loongforge.trainer.model import build_model_chunks, model_provider, run_settings
    from loongforge_ckpt.native import megatron_session
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ckpt_root / "config.yaml")
    cfg.parallel.tp = cfg.parallel.pp = 1
    plugins = plugins or get_plugin_manager()
    with megatron_session() as backend:
        provider = model_provider(cfg, plugins)
        chunks = build_model_chunks(provider, run_settings(cfg), backend, plugins)
        load_checkpoint(step_dir or latest_checkpoint(ckpt_root), chunks, None, backend, load_rng=False)
        with torch.no_grad():
            out = chunks[0].eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    return out, int(cfg.model.vocab_size)


@pytest.fixture
def our_logits():
    return _our_logits


def _assert_same_tensors(a: Path, b: Path) -> None:
    """The safetensors of HF directories ``a`` and ``b`` hold the same names, dtypes, shapes and bits."""
    import torch
    from loongforge_ckpt.safetensors_io import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(ca.names) == sorted(cb.names)
    for n in ca.names:
        ta, tb = ca.read(n), cb.read(n)
        assert tb.dtype == ta.dtype and tb.shape == ta.shape and torch.equal(tb, ta), n


@pytest.fixture
def same_tensors():
    return _assert_same_tensors
