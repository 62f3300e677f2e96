"""The plugin module: records, config dir, no heavy imports, discovery through the entry point."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys

from loongforge.registry import load_object
from loongforge_llm import plugin


def test_plugin_module_imports_no_torch():
    code = (
        "import sys, loongforge_llm.plugin as p; p.loongforge_register_models(); p.loongforge_config_dirs();"
        "heavy = [m for m in ('torch', 'megatron', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_records():
    assert plugin.LOONGFORGE_API_VERSION == "1.0"
    records = {r.name: r for r in plugin.loongforge_register_models()}
    assert set(records) == {"llama", "qwen2", "qwen3", "mimo", "qwen3_moe", "deepseek_v3"}
    assert records["qwen2"].hf_model_types == ("qwen2",)
    assert records["llama"].config_groups == ("models/llama2", "models/llama3")
    assert "EXPERIMENTAL" in records["mimo"].description
    for r in records.values():
        expected = {"qwen3_moe": "MoEProvider", "deepseek_v3": "DeepseekV3Provider"}.get(r.name, "LLMProvider")
        assert load_object(r.builder).__name__ == expected
        assert callable(load_object(r.from_hf_config))
        assert r.supported == (r.name != "mimo")
    (cdir,) = plugin.loongforge_config_dirs()
    assert cdir.path == "pkg://loongforge_llm.configs" and cdir.provider == "llm"
    assert (importlib.resources.files("loongforge_llm.configs") / "models" / "qwen3" / "qwen3_0.6b.yaml").is_file()


def test_discovered_through_entry_point(monkeypatch):
    from loongforge.plugins import create_plugin_manager

    monkeypatch.setenv("LOONGFORGE_LOAD_PLUGINS", "llm")
    pm = create_plugin_manager()
    assert not pm.failures, pm.failures
    registry = pm.registry()
    assert {"llama", "qwen2", "qwen3", "mimo"} <= set(registry.models)
    assert registry.owners[("models", "qwen3")] == "llm"
    assert any(d.path == "pkg://loongforge_llm.configs" for d in registry.config_dirs)
