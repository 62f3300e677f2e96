"""A model family from another plugin converts with its own declarative mapping: loongforge-ckpt
finds it through the registry (``ModelFamily.hf_model_types`` + the provider's ``weight_mapping()``
and ``hf_config()``), nothing in this package names it.

``toy_family`` (next to this file) stores the LLaMA architecture under other HF tensor names;
a random llama2_tiny model renamed into that layout must round-trip bit for bit and give the
HF LLaMA model's logits from our model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def toy_plugins(monkeypatch):
    """A plugin manager with the installed plugins plus ``toy_family`` registered."""
    from loongforge.plugins import create_plugin_manager

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import toy_family

    plugins = create_plugin_manager()
    plugins.pm.register(toy_family, name="toy-family")
    assert plugins.registry().owners[("models", "toy_llama")] == "toy-family"
    return plugins


def test_third_party_family_round_trip_and_logits(converted, our_logits, same_tensors, toy_plugins, tmp_path):
    import toy_family
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf
    from safetensors.torch import load_file, save_file

    c = converted("llama2_tiny")
    hf = tmp_path / "toy_hf"
    hf.mkdir()
    config = json.loads((c["hf"] / "config.json").read_text())
    config.update(model_type="toy_llama", architectures=["ToyLlamaForCausalLM"])
    (hf / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(c["hf"] / "model.safetensors"))
    save_file({toy_family.toy_name(n): t for n, t in tensors.items()}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})

    quiet = {"log": lambda *_: None, "plugins": toy_plugins}
    convert_hf_to_mcore(hf, tmp_path / "ckpt", **quiet)
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="64KB", **quiet)
    same_tensors(hf, tmp_path / "back")
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_config["model_type"] == "toy_llama"

    logits, vocab = our_logits(tmp_path / "ckpt", c["ids"], plugins=toy_plugins)
    rel = ((logits[..., :vocab] - c["logits"]).norm() / c["logits"].norm()).item()
    print(f"\ntoy_llama (third-party mapping) vs HF LLaMA: rel err {rel:.2e}")
    assert rel < 1e-5
