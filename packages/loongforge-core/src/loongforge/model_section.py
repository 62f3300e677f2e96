"""The ``model`` config section: ``model.pretrained`` resolution and the family's provider (no torch).

``model.pretrained=HF_DIR`` takes the architecture from ``HF_DIR/config.json``:

* the family comes from its ``model_type`` (a ``model.family`` the user sets must load it);
* the section is the family's reading of the config.json (``ModelFamily.from_hf_config``;
  without one, the config.json's keys as they are);
* keys that came from a model size the config's defaults list selected (e.g. the default
  config's ``qwen3_demo`` sizes) are dropped: the HF model is what is loaded;
* keys the user set explicitly (in the config file's own ``model:`` block or as ``model.KEY=...``
  on the command line) are kept; one that disagrees with the config.json is refused by name.

Precedence and provenance are decided by :func:`loongforge.config.compose_config`, which passes
the explicit keys here; a section built in code (no provenance) treats every key as explicit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loongforge.config import ConfigError

#: keys of our own that a ``model`` section may hold beside the architecture
OWN_KEYS = ("family", "pretrained")


def _plain(node) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def read_hf_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"config key 'model.pretrained': {path} has no config.json (an HF model directory is expected)")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_file}: not a readable JSON file ({exc})") from exc
    if not isinstance(hf, dict):
        raise ConfigError(f"{config_file}: expected a JSON object")
    return hf


def family_for(hf: dict[str, Any], config_file: Path, registry, family: str | None = None) -> str:
    """The registered family that loads ``hf``'s ``model_type`` (``family``: the user's choice, checked)."""
    model_type = hf.get("model_type")
    matches = sorted(n for n, rec in registry.models.items() if model_type in rec.hf_model_types)
    if family is not None:
        if family not in matches and family in registry.models:
            raise ConfigError(f"config key 'model.family': {family!r} does not load {config_file} (model_type "
                              f"{model_type!r}{'; ' + ', '.join(matches) + ' does' if matches else ''}); remove it")
        return family
    if not matches:
        raise ConfigError(f"{config_file}: no installed model family loads model_type {model_type!r}")
    if len(matches) > 1:
        raise ConfigError(f"{config_file}: model_type {model_type!r} is claimed by several families "
                          f"({', '.join(matches)}); set model.family")
    return matches[0]


def section_from_hf(hf: dict[str, Any], family: str, registry) -> dict[str, Any]:
    """The family's ``model`` section for an HF config.json (``ModelFamily.from_hf_config``)."""
    from loongforge.registry import load_object

    section = {k: v for k, v in hf.items() if not k.startswith("_")}
    section["family"] = family
    record = registry.models.get(family)
    if record is not None and record.from_hf_config:
        section = dict(load_object(record.from_hf_config)(section))
        section["family"] = family
    return section


def validate_hf_config(hf: dict[str, Any], config_file: Path, plugins=None) -> dict[str, Any]:
    """The ``model`` section of an HF ``config.json``, read and validated by its family, without
    importing torch (converters call it first, so a config error is reported before heavy imports)."""
    if plugins is None:
        from loongforge.plugins import get_plugin_manager

        plugins = get_plugin_manager()
    registry = plugins.registry() if hasattr(plugins, "registry") else plugins
    return section_from_hf(hf, family_for(hf, Path(config_file), registry), registry)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def resolve_model_section(cfg, plugins, explicit: dict[str, str] | None = None):
    """``model.pretrained``: fill the section from the HF ``config.json`` (see the module docstring).

    ``explicit``: the model keys the user set -> where (None: every key of the section). Idempotent."""
    from omegaconf import OmegaConf, open_dict

    if not cfg.model.get("pretrained"):
        return cfg
    registry = plugins.registry() if hasattr(plugins, "registry") else plugins
    path = Path(cfg.model.pretrained)
    hf = read_hf_config(path)
    current = _plain(cfg.model)
    at_compose = explicit is not None
    where = dict(explicit or {})
    explicit = set(current) if explicit is None else set(explicit) & set(current)
    chosen = current.get("family") if "family" in explicit else None
    record = registry.models.get(chosen or family_for(hf, path / "config.json", registry))
    if record is None or not record.from_hf_config:
        if at_compose:
            return cfg  # a family without a declared reading of config.json: its task resolves the section
        # such a family gets the config.json's keys under the section's own (the section wins)
        with open_dict(cfg):
            cfg.model = {**{k: v for k, v in hf.items() if not k.startswith("_")}, **current,
                         "family": chosen or record.name}
        return cfg
    family = family_for(hf, path / "config.json", registry, chosen)
    section = section_from_hf(hf, family, registry)
    for key in sorted(explicit - set(OWN_KEYS)):
        if key in section and not _same(current[key], section[key]):
            raise ConfigError(
                f"config key 'model.{key}' is {current[key]!r} ({where.get(key, 'in the model section')}) but "
                f"{path / 'config.json'} has {key}={section[key]!r}: with model.pretrained the architecture comes from the config.json; "
                f"remove model.{key}"
            )
    with open_dict(cfg):
        cfg.model = OmegaConf.create({**section, **{k: current[k] for k in explicit}, "family": family,
                                      "pretrained": str(cfg.model.pretrained)})
    return cfg


def check_pretrained_weights(path: str | Path) -> None:
    """Every safetensors file of the HF directory opens (its header and size agree): a truncated
    or missing shard fails here, naming the file, before any process starts."""
    from safetensors import safe_open

    from loongforge.weight_mapping import MappingError

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError) as exc:
            raise MappingError(f"{index}: not a safetensors index ({exc})") from exc
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MappingError(f"config key 'model.pretrained': {path} has no *.safetensors weights")
    for file in files:
        if not file.is_file():
            raise MappingError(f"{file} is missing (named by {index.name})")
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise MappingError(f"{file}: cannot read it as safetensors ({exc}); truncated or corrupt file?") from exc


def model_provider(cfg, plugins):
    """The provider of the family named by ``model.family`` (``builder(model_cfg)``)."""
    from loongforge.plugins import lookup
    from loongforge.registry import load_object

    cfg = resolve_model_section(cfg, plugins)
    family = cfg.model.get("family")
    if not family:
        raise ConfigError("config key 'model.family' is missing: pick a model config, e.g. "
                          "'defaults: [{/models/qwen3@model: qwen3_0.6b}]'")
    record = lookup(plugins.registry().models, family, "model family (config key 'model.family')", plugins.failures)
    return load_object(record.builder)(cfg.model)
