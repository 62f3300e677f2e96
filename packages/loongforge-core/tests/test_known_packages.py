"""``loongforge.known_packages`` is true to what the workspace's plugins register, both ways:
every name it lists is registered by that distribution, and every name a plugin registers (run
configs, config groups, tasks, model families, components, datasets, tokenizers, converters,
backends) is listed, so a new one cannot be added without its install hint."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path

from loongforge import known_packages
from loongforge.plugins import create_plugin_manager

REPO = Path(__file__).resolve().parents[3]
REGISTRY_KINDS = ("tasks", "models", "components", "datasets", "tokenizers", "converters", "backends")


def _provided() -> dict[str, dict[str, str]]:
    """kind -> name -> distribution, as the installed plugins register them (the core's own
    names excluded: the core is always there)."""
    pm = create_plugin_manager()
    assert not pm.failures, pm.failures
    dist_of = {p.name: p.distribution for p in pm.plugins}
    registry = pm.registry()
    out: dict[str, dict[str, str]] = {kind: {} for kind in (*REGISTRY_KINDS, "config", "config_group")}
    for kind in REGISTRY_KINDS:
        for name in getattr(registry, kind):
            dist = dist_of[registry.owners[(kind, name)]]
            if dist != "loongforge-core":
                out[kind][name] = dist
    for config_dir in registry.config_dirs:
        dist = dist_of[config_dir.provider]
        root = files(config_dir.path.removeprefix("pkg://"))
        for entry in root.iterdir():
            if entry.name.endswith(".yaml"):
                out["config"][entry.name.removesuffix(".yaml")] = dist
        for group_root in (g for g in root.iterdir() if g.is_dir() and not g.name.startswith("__")):
            for group in (g for g in group_root.iterdir() if g.is_dir() and not g.name.startswith("__")):
                if any(f.name.endswith(".yaml") for f in group.iterdir()):
                    out["config_group"][f"{group_root.name}/{group.name}"] = dist
    return out


def test_table_matches_what_plugins_register():
    provided, table = _provided(), known_packages.PROVIDERS
    missing = [f'    PROVIDERS["{kind}"]["{name}"] = "{dist}"' for kind, names in provided.items()
               for name, dist in sorted(names.items()) if table.get(kind, {}).get(name) != dist]
    assert not missing, "loongforge/known_packages.py does not know:\n" + "\n".join(missing)
    stale = [f"{kind} {name!r} ({dist})" for kind, names in table.items() for name, dist in names.items()
             if provided.get(kind, {}).get(name) != dist]
    assert not stale, "loongforge/known_packages.py lists names no plugin registers: " + ", ".join(stale)


def test_every_plugin_distribution_has_an_extra():
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dist, extra in known_packages.EXTRAS.items():
        assert any(r.startswith(dist) for r in root[extra]), f"extra {extra!r} does not install {dist}"


def test_group_prefix_and_install_command():
    assert known_packages.provider("config_group", "/models/qwen3/qwen3_demo") == "loongforge-models-llm"
    assert known_packages.provider("config_group", "models/nothing") is None
    assert known_packages.install_command("loongforge-models-vlm") == (
        "install loongforge-models-vlm (pip install 'loongforge[vlm]')")
