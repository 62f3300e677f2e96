"""Compose a run config with Hydra from the plugins' config directories, then validate it."""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from loongforge.config.schema import RunConfig
from loongforge.errors import LoongForgeError


class ConfigError(LoongForgeError, ValueError):
    """A config that cannot be composed or does not fit the schema; the message names the key."""


def _search_paths(registry) -> list[str]:
    return [d.path for d in registry.config_dirs]


def _primary(config: str, search_paths: list[str]) -> tuple[str, str, list[str]]:
    """(config_dir, config_name, search paths) for a file path or a config name in the plugins' dirs."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {config!r} does not exist")
        return str(path.resolve().parent), path.stem, search_paths
    return _dir_holding(config, search_paths), config, search_paths


def _dir_holding(name: str, search_paths: list[str]) -> str:
    """The first plugin config dir that has ``name.yaml`` (Hydra looks up a primary config in the
    primary dir only, so a run config shipped by a later plugin must be made primary)."""
    from importlib.resources import files

    for d in search_paths:
        if d.startswith("pkg://"):
            try:
                if files(d.removeprefix("pkg://")).joinpath(f"{name}.yaml").is_file():
                    return d
            except ModuleNotFoundError:
                continue
    return search_paths[0] if search_paths else "."


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def _check_keys(node: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Unknown keys with their full dotted name and the closest valid names."""
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in schema:
            options = [str(k) for k in schema.keys()]
            raise ConfigError(
                f"unknown config key {full!r}.{_did_you_mean(str(key), options)} "
                f"Valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(options)}"
            )
        sub, sub_schema = node[key], schema[key]
        if isinstance(sub, DictConfig) and isinstance(sub_schema, DictConfig) and key != "model":
            _check_keys(sub, sub_schema, full + ".")


def run_schema(registry=None) -> DictConfig:
    """The run config's schema: the core's sections plus the plugins' registered config sections."""
    schema = OmegaConf.structured(RunConfig)
    if registry is not None and registry.config_sections:
        from omegaconf import open_dict

        from loongforge.registry import load_object

        with open_dict(schema):
            for name, section in registry.config_sections.items():
                if name in schema:
                    raise ConfigError(f"config section {name!r} of a plugin clashes with the core's section")
                schema[name] = OmegaConf.structured(load_object(section.schema))
    return schema


def validate(cfg: DictConfig, registry=None) -> DictConfig:
    """Merge ``cfg`` into the schema (with the plugins' sections from ``registry``): unknown keys
    and wrong types fail naming the key."""
    schema = run_schema(registry)
    _check_keys(cfg, schema)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except (ValidationError, ConfigKeyError) as exc:
        raise ConfigError(f"config key {exc.full_key!r}: {exc.msg}") from exc
    return merged


def _as_upserts(overrides) -> list[str]:
    """``key=value`` -> ``++key=value``: a key the schema has but the file does not may be set, and
    an unknown key reaches the schema check (which names it) instead of Hydra's generic error.
    Group selections (``models/qwen3@model=qwen3_1.7b``) and ``+``/``~`` overrides pass as they are."""
    out = []
    for override in overrides:
        key = override.split("=", 1)[0]
        plain = "=" in override and not key.startswith(("+", "~")) and "/" not in key and "@" not in key
        out.append(f"++{override}" if plain else override)
    return out


def compose_config(config: str, overrides: list[str] = (), registry=None) -> DictConfig:
    """Compose ``config`` (a YAML path or a config name) with ``key=value`` overrides, validated."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    if registry is None:
        from loongforge.plugins import get_plugin_manager

        registry = get_plugin_manager().registry()
    config_dir, name, search = _primary(config, _search_paths(registry))
    if config_dir == "." and not Path(config).exists():  # a config name that no installed plugin holds
        raise ConfigError(_explain("Cannot find primary config", name, search))
    hydra_overrides = [f"hydra.searchpath=[{','.join(search)}]"] if search else []
    try:
        if config_dir.startswith("pkg://"):
            from hydra import initialize_config_module

            init = initialize_config_module(config_module=config_dir.removeprefix("pkg://"), version_base=None)
        else:
            init = initialize_config_dir(config_dir=config_dir, version_base=None)
        with init:
            cfg = compose(config_name=name, overrides=[*hydra_overrides, *_as_upserts(overrides)])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(str(exc), name, search)) from exc
    cfg = validate(OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)), registry)
    if cfg.model.get("pretrained"):  # the HF config.json, not the defaults list's size, is the model
        from loongforge.model_section import resolve_model_section

        cfg = resolve_model_section(cfg, registry, explicit=explicit_model_keys(config_dir, name, overrides))
    return cfg


def explicit_model_keys(config_dir: str, name: str, overrides) -> dict[str, str]:
    """``model`` keys the user set -> where: the config file's own ``model:`` block (not a size its
    defaults list selects) and ``model.KEY=...`` command-line overrides."""
    import yaml

    if config_dir.startswith("pkg://"):
        from importlib.resources import files

        primary = files(config_dir.removeprefix("pkg://")).joinpath(f"{name}.yaml")
    else:
        primary = Path(config_dir) / f"{name}.yaml"
    keys: dict[str, str] = {}
    try:
        raw = yaml.safe_load(primary.read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        keys.update({str(k): f"set in {Path(str(primary)).name}" for k in raw["model"]})
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("model.") and "=" in override:
            keys[key.split(".")[1]] = "set on the command line"
    return keys


def _explain(message: str, name: str, search: list[str]) -> str:
    from loongforge.known_packages import hint_for_hydra_message, install_hint

    hint = ""
    if "Cannot find primary config" in message:
        if known := install_hint("config", name):
            return f"no config named {name!r} in the installed plugins. {known}"
        hint = f" Searched: {', '.join(search) or 'no plugin config directories'}."
    elif known := hint_for_hydra_message(message):
        hint = f" {known}"
    elif "Could not override" in message or "Key '" in message:
        hint = " Prefix a new key with '+' to add it, or check its spelling with `loongforge config show`."
    return f"{message.strip()}{hint}"


def list_configs(registry, group: str) -> list[str]:
    """Config names in ``group`` (e.g. ``models/qwen3``) across the plugins' ``pkg://`` directories."""
    from importlib.resources import files

    names: set[str] = set()
    for d in registry.config_dirs:
        if not d.path.startswith("pkg://"):
            continue
        folder = files(d.path.removeprefix("pkg://")).joinpath(group)
        if folder.is_dir():
            names.update(f.name.rsplit(".", 1)[0] for f in folder.iterdir() if f.name.endswith((".yaml", ".yml")))
    return sorted(names)
