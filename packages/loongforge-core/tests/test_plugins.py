"""Plugin discovery through entry points, refusal of broken plugins, the registry's rules."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pluggy
import pytest
from loongforge import API_VERSION, hookimpl, hookspecs
from loongforge.plugins import RegistryError, create_plugin_manager, lookup
from loongforge.registry import ModelFamily
from loongforge.testing import run_cli

WORKSPACE_PLUGINS = {"ckpt", "cuda", "diffusion", "embodied", "kernels", "llm", "vlm", "xpu"}


def test_every_workspace_package_is_discovered():
    pm = create_plugin_manager()
    loaded = {p.name: p for p in pm.plugins}
    assert WORKSPACE_PLUGINS | {"core"} <= set(loaded)
    for name in WORKSPACE_PLUGINS:
        assert loaded[name].error is None, loaded[name].error
        assert loaded[name].version == version(loaded[name].distribution)  # the installed metadata
        assert loaded[name].distribution.startswith("loongforge-")


def test_third_party_plugin_is_discovered_and_its_model_builds(with_third_party):
    from loongforge.model_provider import RunSettings
    from loongforge.registry import load_object
    from loongforge.testing import single_process_megatron

    pm = create_plugin_manager()
    info = {p.name: p for p in pm.plugins}["example"]
    assert (info.distribution, info.version, info.error) == ("loongforge-example-plugin", "0.3.1", None)
    assert "loongforge_register_models" in info.hooks
    registry = pm.registry()
    family = lookup(registry.models, "tiny_gpt", "model family")
    assert registry.owners[("models", "tiny_gpt")] == "example"

    import torch
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.load(with_third_party / "loongforge_example/configs/models/tiny_gpt/tiny_gpt_2l.yaml")
    with single_process_megatron() as backend:
        provider = load_object(family.builder)(model_cfg)
        run = RunSettings(seq_length=16)
        model = provider.build(provider.transformer_config(run), run, backend=backend,
                               pre_process=True, post_process=True)
        tokens = torch.randint(0, 128, (2, 16))
        logits = model(tokens, torch.arange(16)[None].expand(2, -1), None)
    assert logits.shape == (2, 16, 128)
    assert torch.isfinite(logits).all()


def test_broken_and_incompatible_plugins_are_refused_by_name(with_third_party):
    pm = create_plugin_manager()
    failures = {f.name: f for f in pm.failures}
    assert set(failures) == {"broken", "incompatible"}
    broken = failures["broken"]
    assert broken.distribution == "loongforge-broken-plugin"
    assert "ImportError" in broken.error and "frobnicate" in broken.error
    incompatible = failures["incompatible"]
    assert "0.9" in incompatible.error and API_VERSION in incompatible.error
    # the good plugins still load
    assert "example" in {p.name for p in pm.plugins if not p.error}


def test_cli_plugins_lists_all_packages_and_failures(third_party_site):
    result = run_cli("plugins", extra_path=third_party_site)
    assert result.returncode == 1  # a refused plugin makes the listing fail loudly
    for name in WORKSPACE_PLUGINS | {"example"}:
        assert name in result.stdout
    assert "loongforge-example-plugin" in result.stdout and "0.3.1" in result.stdout
    assert "REFUSED" in result.stdout and "frobnicate" in result.stdout
    clean = run_cli("plugins")
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_load_plugins_env_limits_discovery(monkeypatch):
    monkeypatch.setenv("LOONGFORGE_LOAD_PLUGINS", "cuda")
    names = {p.name for p in create_plugin_manager().plugins}
    assert names == {"core", "cuda"}
    monkeypatch.setenv("LOONGFORGE_LOAD_PLUGINS", "")
    assert {p.name for p in create_plugin_manager().plugins} == {"core"}


class _DuplicateModels:
    LOONGFORGE_API_VERSION = API_VERSION

    @staticmethod
    @hookimpl
    def loongforge_register_models():
        return [ModelFamily(name="qwen3", builder="x:y")]


def test_duplicate_registration_names_both_plugins():
    pm = create_plugin_manager()
    pm.pm.register(_DuplicateModels, name="dupe")
    with pytest.raises(RegistryError, match=r"'qwen3' is registered by both plugin 'llm' and plugin 'dupe'"):
        pm.registry()


def test_lookup_suggests_close_names():
    with pytest.raises(RegistryError, match=r"Did you mean 'qwen3'"):
        lookup({"qwen3": 1, "llama3": 2}, "qwen", "model family")


def test_every_hookspec_is_documented_and_known_to_pluggy():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("loongforge_")]
    assert len(specs) >= 19
    for spec in specs:
        assert spec.__doc__ and len(spec.__doc__.strip()) > 30, spec.__name__
    pm = pluggy.PluginManager("loongforge")
    pm.add_hookspecs(hookspecs)
    assert {f.__name__ for f in specs} <= set(dir(pm.hook))
