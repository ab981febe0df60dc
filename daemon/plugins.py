"""The plugin manager: built-in plugins, entry points of the `secondlook` group, registries."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from daemon import hookspecs
from daemon.config import Settings
from daemon.plugin_api import AlertFormat, BackendFactory, RuleKind

ENTRY_POINT_GROUP = "secondlook"

#: built-in plugins; installed packages also declare them in the entry point group
DEFAULT_PLUGINS: dict[str, str] = {
    "canonical": "plugins.canonical",
    "verdict": "plugins.verdict",
    "extract": "plugins.extract",
    "classify": "plugins.classify",
    "cooldown": "plugins.cooldown",
    "frigate": "plugins.frigate",
    "mapping": "plugins.mapping",
    "transformers": "daemon.inference.transformers_backend",
    "instant": "daemon.inference.instant",
    "openai": "daemon.inference.openai_backend",
}


class PluginError(Exception):
    """A plugin that does not fit its hook (duplicate name, missing attribute ...)."""


def is_plugin_failure(exc: BaseException) -> bool:
    """Whether `exc`, raised from a plugin's code, is that plugin's failure, to be handled
    like any error: everything but the cancellation of the task that called it (a plugin's
    SystemExit, KeyboardInterrupt or stray CancelledError must not end the daemon)."""
    if not isinstance(exc, asyncio.CancelledError):
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop
        return True
    return task is None or not task.cancelling()


def plain_impls(hook: pluggy.HookCaller) -> list[pluggy.HookImpl]:
    """A hook's implementations other than wrappers, in registration order (pluggy calls
    them last first)."""
    return [impl for impl in hook.get_hookimpls() if not (impl.hookwrapper or impl.wrapper)]


def call_impl(impl: pluggy.HookImpl, arguments: Mapping[str, Any]) -> Any:
    """One implementation called as pluggy calls it: the arguments it names, in order (so
    that each plugin's failure can be told apart)."""
    return impl.function(*(arguments[name] for name in impl.argnames))


def make_plugin_manager(
    extra_plugins: Iterable[object] = (), plugins_dir: Path | None = None
) -> pluggy.PluginManager:
    """Entry points first, then any built-in not already loaded, then the loose files of
    `plugins_dir`, then `extra_plugins`. Hook implementations that match no hook fail here."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    check_entry_point_names()
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    except Exception as exc:
        raise PluginError(
            f"installed plugin {_failing_entry_point()}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        for name, module in DEFAULT_PLUGINS.items():
            if pm.get_plugin(name) is None:
                pm.register(importlib.import_module(module), name=name)
        if plugins_dir is not None:
            if not plugins_dir.is_dir():  # a typo would otherwise leave its plugins out quietly
                raise PluginError(f"[plugins] dir {plugins_dir}: no such directory")
            for path in sorted(plugins_dir.glob("*.py")):
                pm.register(load_plugin_file(path), name=f"file:{path.name}")
        for plugin in extra_plugins:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # a misnamed hook or argument
        raise PluginError(str(exc)) from exc
    return pm


def _failing_entry_point() -> str:
    """The installed plugin (entry point) that fails to import, named with its package."""
    for dist in importlib.metadata.distributions():
        for point in dist.entry_points:
            if point.group != ENTRY_POINT_GROUP:
                continue
            try:
                point.load()
            except Exception:
                return f"{point.name!r} ({dist.metadata['Name']}, {point.value})"
    return "(unknown)"


def check_entry_point_names() -> None:
    """PluginError when two installed packages declare one plugin name in the entry point
    group (pluggy would load one of them and silently skip the other: a third-party
    `cooldown` would replace the built-in, or be dropped, as the packages happen to be
    found)."""
    declared: dict[str, tuple[str, str]] = {}
    for dist in importlib.metadata.distributions():
        for point in dist.entry_points:
            if point.group != ENTRY_POINT_GROUP:
                continue
            package = dist.metadata["Name"] or "?"
            earlier = declared.setdefault(point.name, (package, point.value))
            # one package found twice (an editable install and its build metadata) is fine
            if _same_package(earlier[0], package):
                continue
            if earlier[1] != point.value:
                raise PluginError(
                    f"two packages declare the plugin {point.name!r}: {earlier[0]} "
                    f"({earlier[1]}) and {package} ({point.value}); one must rename it"
                )


def _same_package(a: str, b: str) -> bool:
    """Package names compared as pip does (case, and "-", "_", "." alike)."""
    return re.sub(r"[-_.]+", "-", a).lower() == re.sub(r"[-_.]+", "-", b).lower()


def load_plugin_file(path: Path) -> ModuleType:
    """Import one loose plugin file as a module of its own (in sys.modules, as an import
    would put it: dataclasses and pydantic look their module up there)."""
    name = f"secondlook_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a file that exits on import stops no daemon
        del sys.modules[name]
        raise PluginError(f"{path}: {type(exc).__name__}: {exc}") from exc
    return module


@dataclass
class Registry:
    """What the plugins registered, by name."""

    rule_kinds: dict[str, RuleKind] = field(default_factory=dict)
    alert_formats: dict[str, AlertFormat] = field(default_factory=dict)
    backends: dict[str, BackendFactory] = field(default_factory=dict)
    #: the plugin that registered each (what, name)
    _owners: dict[tuple[str, str], str] = field(default_factory=dict)
    #: the plugin whose registration hook runs now
    _calling: str = ""

    @classmethod
    def collect(cls, pm: pluggy.PluginManager, settings: Settings | None = None) -> Registry:
        """Call every plugin's registration hooks; PluginError naming the plugin for one
        that fails or registers something unfit."""
        registry = cls()
        given = {
            "register_rule_kinds": {"register": registry._add_kind},
            "register_alert_formats": {
                "register": registry._add_format,
                "settings": settings or Settings(),
            },
            "register_backends": {"register": registry._add_backend},
        }
        for hook_name, arguments in given.items():
            # in pluggy's order (the last registered first), one plugin at a time
            for impl in reversed(plain_impls(getattr(pm.hook, hook_name))):
                registry._calling = pm.get_name(impl.plugin) or repr(impl.plugin)
                try:
                    call_impl(impl, arguments)
                except PluginError:
                    raise
                except (Exception, SystemExit) as exc:  # an exit would end it with status 0
                    raise PluginError(
                        f"plugin {registry._calling}: {hook_name} failed: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        return registry

    def _add_kind(self, kind: Any) -> None:
        self._require(kind, "rule kind", ("name", "Options", "compose", "interpret"))
        self._claim(self.rule_kinds, kind.name, "rule kind")
        self.rule_kinds[kind.name] = kind

    def _add_format(self, fmt: Any) -> None:
        self._require(fmt, "alert format", ("name", "parse"))
        self._claim(self.alert_formats, fmt.name, "alert format")
        self.alert_formats[fmt.name] = fmt

    def _add_backend(self, name: Any, factory: Any) -> None:
        if not callable(factory):
            raise PluginError(f"plugin {self._calling}: backend {name!r}: factory is not callable")
        self._claim(self.backends, name, "backend")
        self.backends[name] = factory

    def _require(self, obj: Any, what: str, attributes: tuple[str, ...]) -> None:
        missing = [a for a in attributes if not hasattr(obj, a)]
        if missing:
            raise PluginError(f"plugin {self._calling}: {what} {obj!r} lacks {', '.join(missing)}")

    def _claim(self, registered: dict[str, Any], name: Any, what: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin {self._calling}: a {what}'s name must be a text, not {name!r}"
            )
        if name in registered:
            raise PluginError(
                f"two plugins register the {what} {name!r}: "
                f"{self._owners[(what, name)]} and {self._calling}"
            )
        self._owners[(what, name)] = self._calling


@dataclass(frozen=True)
class PluginInfo:
    name: str
    #: the module, file or distribution the plugin comes from
    source: str
    hooks: list[str]


def describe_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with the hooks it implements, by name."""
    dists = {
        id(plugin): f"{dist.project_name} {dist.version}"
        for plugin, dist in pm.list_plugin_distinfo()
    }
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        source = getattr(plugin, "__file__", None) or type(plugin).__module__
        if id(plugin) in dists:
            source = f"{getattr(plugin, '__name__', source)} ({dists[id(plugin)]})"
        elif isinstance(plugin, ModuleType) and not name.startswith("file:"):
            source = plugin.__name__
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        infos.append(PluginInfo(name, source, hooks))
    return sorted(infos, key=lambda info: info.name)
