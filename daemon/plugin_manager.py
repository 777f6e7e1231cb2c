"""Finding and registering plugins: built-ins, installed packages, and site files.

Built-in plugins are ordinary plugins, registered from :data:`BUILTIN_PLUGINS`; installed ones
come from the ``certwarden.plugins`` entry-point group; site-specific ones from the Python files
named in ``[daemon] plugin_files``. A plugin module that defines a ``Plugin`` class is
registered as an instance of it (so it can keep its context), otherwise as the module. Its
``Settings`` attribute, a :class:`~certwarden.config.PluginSettings` subclass, validates its
``[plugins.NAME]`` section. ``check_pending()`` turns a misspelled hook into an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from certwarden import hookspecs
from certwarden.config import (
    Config,
    PluginSettings,
    config_given,
    config_path,
    parse_config,
    read_config_file,
)
from certwarden.errors import ConfigError, PluginError
from certwarden.pki.names import is_valid_name

# Registered in this order; each is an ordinary plugin with its own [plugins.NAME] section.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "certwarden.plugins.exec",
    "certwarden.plugins.nginx",
    "certwarden.plugins.mdm",
    "certwarden.plugins.email",
    "certwarden.plugins.firewall",
)
ENTRY_POINT_GROUP = "certwarden.plugins"


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    source: str  # "built-in", "package NAME VERSION", "file PATH"
    plugin: object  # what is registered with pluggy
    settings_class: type[PluginSettings]


class PluginSet:
    """The pluggy manager and what certwarden knows about each registered plugin."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.loaded: dict[str, LoadedPlugin] = {}

    def __iter__(self) -> Iterator[LoadedPlugin]:
        return iter(self.loaded.values())

    def register(self, name: str, target: ModuleType | object, source: str) -> LoadedPlugin:
        if not is_valid_name(name) or not name.replace("-", "_").isidentifier():
            raise PluginError(f"plugin {name!r} from {source}: name must be a Python identifier")
        if name in self.loaded:
            raise PluginError(
                f"plugin {name!r} from {source}: a plugin of that name is already loaded "
                f"from {self.loaded[name].source}; rename one of them"
            )
        plugin: object = target
        factory = getattr(target, "Plugin", None)
        if isinstance(target, ModuleType) and inspect.isclass(factory):
            plugin = factory()
        elif inspect.isclass(target):
            plugin = target()
        settings = getattr(plugin, "Settings", None) or getattr(target, "Settings", None)
        if settings is None:
            settings = PluginSettings
        if not (inspect.isclass(settings) and issubclass(settings, PluginSettings)):
            raise PluginError(
                f"plugin {name!r} from {source}: Settings must subclass "
                "certwarden.config.PluginSettings"
            )
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} from {source}: {exc}") from None
        loaded = LoadedPlugin(name, source, plugin, settings)
        self.loaded[name] = loaded
        return loaded

    def load_builtins(self) -> None:
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            self.register(module_name.rsplit(".", 1)[1], module, "built-in")

    def load_entry_points(self) -> None:
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            source = f"package {dist.name} {dist.version}" if dist else "entry point"
            try:
                target = entry_point.load()
            except Exception as exc:  # a broken third-party package must not hide the cause
                raise PluginError(
                    f"plugin {entry_point.name!r} from {source}: cannot be imported "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            self.register(entry_point.name, target, source)

    def load_file(self, path: Path) -> None:
        name = path.stem
        module_name = f"certwarden_site_plugin_{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"{path}: not a Python file that can be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise PluginError(
                f"{path}: the plugin failed to import ({type(exc).__name__}: {exc})"
            ) from exc
        self.register(name, module, f"file {path}")

    def check(self) -> None:
        """Fail on hooks that certwarden does not define (usually a typo)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin_name = self.pm.get_name(exc.plugin) or "?"
            source = self.loaded[plugin_name].source if plugin_name in self.loaded else "?"
            raise PluginError(
                f"plugin {plugin_name!r} ({source}): {exc}; the hooks are listed in docs/plugins.md"
            ) from None

    def schemas(self) -> dict[str, type[PluginSettings]]:
        return {name: loaded.settings_class for name, loaded in self.loaded.items()}

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.loaded[name].plugin
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(caller.name for caller in callers)

    def implementations(self, hook_name: str) -> list[tuple[str, Any]]:
        """(plugin name, function) of every implementation of ``hook_name``."""
        caller = getattr(self.pm.hook, hook_name)
        return [(impl.plugin_name, impl.function) for impl in caller.get_hookimpls()]


def builtin_plugins() -> PluginSet:
    """Only the built-in plugins (for documentation that must not vary between machines)."""
    plugins = PluginSet()
    plugins.load_builtins()
    return plugins


def load_plugins(plugin_files: tuple[Path, ...] | list[Path] = ()) -> PluginSet:
    plugins = PluginSet()
    plugins.load_builtins()
    plugins.load_entry_points()
    for path in plugin_files:
        plugins.load_file(path)
    plugins.check()
    return plugins


def load_config_and_plugins(path: Path | None = None) -> tuple[Config, PluginSet]:
    """Read the configuration, load the plugins it names, validate everything at once."""
    path = path or config_path(None)
    data = read_config_file(path)
    files = _plugin_files(data, path)
    plugins = load_plugins(files)
    config = parse_config(data, str(path), plugins.schemas(), base_dir=path.absolute().parent)
    return config, plugins


def site_plugin_files(config_option: str | None) -> list[Path]:
    """The ``[daemon] plugin_files`` of the configuration, read without validating the rest:
    the command line needs them to know its commands, before any command runs."""
    if not config_given(config_option):
        return []
    path = config_path(config_option)
    return _plugin_files(read_config_file(path), path)


def _plugin_files(data: dict[str, Any], path: Path) -> list[Path]:
    # Plugins must be loaded before the file is validated (they bring its [plugins.*]
    # schemas), so their paths are read from the raw data first and checked on their own.
    daemon = data.get("daemon", {})
    raw = daemon.get("plugin_files", []) if isinstance(daemon, dict) else []
    if not isinstance(raw, list):
        raise ConfigError(["daemon.plugin_files: must be a list of file paths"], str(path))
    files: list[Path] = []
    problems: list[str] = []
    for position, item in enumerate(raw):
        if not isinstance(item, str):
            problems.append(f"daemon.plugin_files[{position}]: must be a file path")
            continue
        file = Path(item)
        if not file.is_absolute():
            file = path.absolute().parent / file
        if not file.is_file():
            problems.append(f"daemon.plugin_files[{position}]: {file} does not exist")
        files.append(file)
    if problems:
        raise ConfigError(problems, str(path))
    return files
