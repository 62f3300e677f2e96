"""Plugin discovery: load ``loongforge.plugins`` entry points into one pluggy manager.

Each entry point loads in its own ``try``: a plugin that fails to import, or that was written for
another hook API major version, is refused and reported by name, version and error, and the rest
still load. ``LOONGFORGE_LOAD_PLUGINS=a,b`` limits which entry points load (empty: none).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

import pluggy

from loongforge import API_VERSION, hookspecs
from loongforge import registry as reg
from loongforge.errors import LoongForgeError

ENTRY_POINT_GROUP = "loongforge.plugins"
ENV_LOAD_PLUGINS = "LOONGFORGE_LOAD_PLUGINS"


class PluginError(LoongForgeError, RuntimeError):
    """A plugin could not be used; the message names it."""


class RegistryError(LoongForgeError, LookupError):
    """A name was not registered, or registered twice; the message says which."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    hooks: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class PluginManager:
    """The loaded plugins, their hooks, and the registry built from them."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)

    @property
    def hook(self):
        return self.pm.hook

    @property
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def registry(self) -> reg.Registry:
        if not hasattr(self, "_registry"):
            self._registry = _collect(self)
        return self._registry


def _api(version: str) -> tuple[int, int]:
    major, _, minor = str(version).partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def _api_error(module: ModuleType) -> str | None:
    """Why a plugin's declared hook API does not fit this core: another major, or a newer minor
    (it may implement hooks this core does not have)."""
    declared = getattr(module, "LOONGFORGE_API_VERSION", None)
    if declared is None:
        return f"declares no LOONGFORGE_API_VERSION (this core's hook API is {API_VERSION})"
    try:
        (major, minor), (core_major, core_minor) = _api(declared), _api(API_VERSION)
    except ValueError:
        return f"declares LOONGFORGE_API_VERSION={declared!r}, not MAJOR.MINOR (this core's is {API_VERSION})"
    if major != core_major:
        return f"was built for hook API {declared}, this core provides {API_VERSION}"
    if minor > core_minor:
        return (f"was built for hook API {declared}, newer than this core's {API_VERSION}: "
                f"upgrade loongforge-core")
    return None


def _hooks_of(pm: pluggy.PluginManager, plugin: object) -> tuple[str, ...]:
    return tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or ()))


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hooks ``plugin`` implements that have no spec here (a misspelling, or a newer API's hook);
    ``optionalhook=True`` implementations are allowed, as in pluggy's ``check_pending``."""
    return sorted(h.name for h in pm.get_hookcallers(plugin) or () if not h.has_spec()
                  and any(i.plugin is plugin and not i.opts.get("optionalhook") for i in h.get_hookimpls()))


def _register(manager: PluginManager, name: str, module: ModuleType, dist: str, version: str) -> None:
    """Register one plugin, validated on its own: a hook implementation that does not match its
    spec, or a hook this core does not have, refuses this plugin (by name) and no other."""
    def refuse(error: str) -> None:
        manager.plugins.append(PluginInfo(name, dist, version, module.__name__, error=error))

    try:
        manager.pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:  # a hookimpl whose arguments or options its spec refuses
        return refuse(f"invalid hook implementation: {' '.join(str(exc).split())}")
    except ValueError as exc:  # the same name registered twice
        return refuse(str(exc))
    if unknown := _unknown_hooks(manager.pm, module):
        manager.pm.unregister(module)
        return refuse(f"implements {', '.join(unknown)}, which hook API {API_VERSION} does not have "
                      "(misspelled, or from a newer loongforge-core)")
    manager.plugins.append(PluginInfo(name, dist, version, module.__name__, _hooks_of(manager.pm, module)))


def _load_entry_point(manager: PluginManager, ep: EntryPoint) -> None:
    dist = ep.dist.name if ep.dist else "?"
    version = ep.dist.version if ep.dist else "?"
    try:
        module = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not hidden
        err = f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}"
        manager.plugins.append(PluginInfo(ep.name, dist, version, ep.value, error=err))
        return
    if (api_err := _api_error(module)) is not None:
        manager.plugins.append(PluginInfo(ep.name, dist, version, ep.value, error=api_err))
        return
    _register(manager, ep.name, module, dist, version)


def _selected(eps: list[EntryPoint]) -> list[EntryPoint]:
    wanted = os.environ.get(ENV_LOAD_PLUGINS)
    if wanted is None:
        return eps
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in names]


def create_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """A fresh manager with the core's built-in plugins and (optionally) every entry point."""
    from loongforge import builtin

    manager = PluginManager(pluggy.PluginManager("loongforge"))
    manager.pm.add_hookspecs(hookspecs)
    from loongforge import __version__

    _register(manager, "core", builtin, "loongforge-core", __version__)
    if load_entry_points:
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        for ep in _selected(list(eps)):
            _load_entry_point(manager, ep)
    try:
        manager.pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist: {exc}") from exc
    return manager


@cache
def get_plugin_manager() -> PluginManager:
    """The process-wide manager (tests create their own with :func:`create_plugin_manager`)."""
    return create_plugin_manager()


_REGISTRY_HOOKS = {
    "models": "loongforge_register_models",
    "components": "loongforge_register_model_components",
    "datasets": "loongforge_register_datasets",
    "tokenizers": "loongforge_register_tokenizers",
    "converters": "loongforge_register_checkpoint_converters",
    "kernels": "loongforge_register_kernels",
    "tasks": "loongforge_register_tasks",
    "backends": "loongforge_register_backends",
    "config_sections": "loongforge_register_config_sections",
}


def _collect(manager: PluginManager) -> reg.Registry:
    registry = reg.Registry()
    for kind, hook_name in _REGISTRY_HOOKS.items():
        table: dict = getattr(registry, kind)
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            for record in impl.function() or ():
                key = (kind, record.name)
                if key in registry.owners:
                    raise RegistryError(
                        f"{kind[:-1]} {record.name!r} is registered by both plugin "
                        f"{registry.owners[key]!r} and plugin {impl.plugin_name!r}"
                    )
                registry.owners[key] = impl.plugin_name
                table[record.name] = record
        setattr(registry, kind, dict(sorted(table.items())))
    for impl in manager.hook.loongforge_config_dirs.get_hookimpls():
        registry.config_dirs.extend(impl.function() or ())
    return registry


def lookup(table: dict, name: str, what: str, failures: list[PluginInfo] = ()):
    """``table[name]``, or a :class:`RegistryError` listing what exists and the closest names."""
    if name in table:
        return table[name]
    from loongforge.known_packages import hint_for_lookup

    close = difflib.get_close_matches(name, list(table), n=3)
    msg = f"unknown {what} {name!r}."
    if hint := hint_for_lookup(what, name):  # a known package provides it: say which, not "did you mean"
        msg, close = f"{msg} {hint}", []
    if close:
        msg += f" Did you mean {', '.join(map(repr, close))}?"
    msg += f" Available: {', '.join(table) or 'none'}."
    if failures:
        msg += " Plugins that failed to load: " + "; ".join(f"{f.name} ({f.error})" for f in failures)
    raise RegistryError(msg)
