"""The plugin manager: discovery, registration and the collected registries.

A fresh manager is built per run and per test (never a global one). Built-in plugins are
modules named in ``BUILTIN_PLUGINS``; third-party ones come from the ``lscape`` entry-point
group; any module can be loaded by import path. ``LSCAPE_TRACE_PLUGINS=1`` prints every
hook call with its arguments and results to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .errors import UsageError

__all__ = ["BUILTIN_PLUGINS", "Entry", "Registry", "get_plugin_manager", "build_registry", "module_version", "first_line",
           "source_version"]

#: Modules loaded in every manager, in this order.
BUILTIN_PLUGINS: tuple[str, ...] = (
    # workloads: every built-in model, data set, loss and base optimizer
    "lscape.plugins.workloads",
    # basics
    "lscape.plugins.basics.train_metrics",
    "lscape.plugins.basics.progress",
    "lscape.plugins.basics.grad_norm",
    # noise
    "lscape.plugins.noise.grad_noise",
    "lscape.plugins.noise.grad_stats",
    # curvature
    "lscape.plugins.curvature.sharpness",
    "lscape.plugins.curvature.hessian",
    "lscape.plugins.curvature.hessian_exact",
    "lscape.plugins.curvature.eos",
    "lscape.plugins.curvature.critical_sharpness",
    # optim
    "lscape.plugins.optim.sam",
    "lscape.plugins.optim.smoothout",
    "lscape.plugins.optim.entropy_sgd",
    # diffusion
    "lscape.plugins.diffusion.trajectory",
    "lscape.plugins.diffusion.diffusion",
    # landscape
    "lscape.plugins.landscape.landscape",
    "lscape.plugins.landscape.interpolate",
    "lscape.plugins.landscape.eps_sharpness",
    # forwarding
    "lscape.plugins.forwarding.tensorboard",
    "lscape.plugins.forwarding.wandb",
)

ENTRY_POINT_GROUP = "lscape"


@dataclass
class Entry:
    """One registered thing: its name, the object, help text and the module that gave it."""

    name: str
    obj: Any
    help: str = ""
    source: str = ""


@dataclass
class Registry:
    """What the loaded plugins registered, by kind."""

    models: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)
    losses: dict[str, Entry] = field(default_factory=dict)
    optimizers: dict[str, Entry] = field(default_factory=dict)
    probes: dict[str, Entry] = field(default_factory=dict)
    step_owners: dict[str, Entry] = field(default_factory=dict)
    plugins: dict[str, Entry] = field(default_factory=dict)
    plots: dict[str, list[Entry]] = field(default_factory=dict)

    def activatable(self) -> dict[str, Entry]:
        """Every plugin class that ``--plugin NAME`` can activate, by name."""
        return {**self.plugins, **self.probes, **self.step_owners}

    def by_source(self, module: str) -> list[Entry]:
        """The activatable plugins that ``module`` registered."""
        return [e for e in self.activatable().values() if e.source == module]


def get_plugin_manager(
    extra: Iterable[str] = (), *, entry_points: bool = True, builtins: bool = True
) -> pluggy.PluginManager:
    """A new manager with the built-ins, the entry-point plugins and ``extra`` modules.

    ``LSCAPE_PLUGINS`` (comma-separated module names), when set, replaces the built-ins
    and entry points, for debugging a plugin in isolation.
    """
    pm = pluggy.PluginManager("lscape")
    pm.add_hookspecs(hookspecs)
    only = os.environ.get("LSCAPE_PLUGINS")
    if only is not None:
        for name in (m.strip() for m in only.split(",") if m.strip()):
            load_module(pm, name)
    else:
        if builtins:
            for name in BUILTIN_PLUGINS:
                pm.register(importlib.import_module(name), name=name)
        if entry_points:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for name in extra:
        load_module(pm, name)
    if os.environ.get("LSCAPE_TRACE_PLUGINS"):
        _enable_tracing(pm)
    return pm


def load_module(pm: pluggy.PluginManager, name: str) -> ModuleType:
    """Import a plugin module by dotted path and register it (once)."""
    existing = pm.get_plugin(name)
    if existing is not None:
        return existing
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"cannot import plugin module '{name}': {e}") from e
    pm.register(module, name=name)
    return module


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook once and collect what was registered."""
    reg = Registry()
    simple = {
        "register_models": reg.models,
        "register_datasets": reg.datasets,
        "register_losses": reg.losses,
        "register_optimizers": reg.optimizers,
    }
    for hook_name, table in simple.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            _call(impl, hook_name, register=_named_registrar(table, impl.plugin_name, hook_name))
    classes = {
        "register_probes": reg.probes,
        "register_step_owners": reg.step_owners,
        "register_plugins": reg.plugins,
    }
    for hook_name, table in classes.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            _call(impl, hook_name, register=_class_registrar(reg, table, impl.plugin_name))
    for impl in pm.hook.register_plots.get_hookimpls():

        def register(group: str, fn: Callable, _src=impl.plugin_name) -> None:
            reg.plots.setdefault(group, []).append(Entry(group, fn, "", _src))

        _call(impl, "register_plots", register=register)
    from .curvature.registry import register_operator

    # matrices go to the one operator table every probe's `kind` reads (a module loaded with
    # --plugin my.module included)
    for impl in pm.hook.register_curvature_operators.get_hookimpls():
        _call(impl, "register_curvature_operators", register=register_operator)
    return reg


def module_version(module: str) -> str:
    """The version of the distribution that provides plugin module ``module``."""
    if module.startswith("lscape."):
        from . import __version__

        return __version__
    try:
        from importlib.metadata import packages_distributions, version

        dists = packages_distributions().get(module.split(".")[0], [])
        return version(dists[0]) if dists else "unknown"
    except Exception:  # metadata is best effort: never fail a run over a version string
        return "unknown"


def source_version(pm: pluggy.PluginManager, name: str) -> str:
    """The version of the plugin module registered as ``name`` (entry points: their
    distribution's version)."""
    plugin = pm.get_plugin(name)
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return dist.version
    return module_version(getattr(plugin, "__name__", name))


def _call(impl: pluggy.HookImpl, hook_name: str, **kwargs: Any) -> None:
    # Called per implementation so that each registration knows which module made it.
    args = {k: v for k, v in kwargs.items() if k in impl.argnames}
    if os.environ.get("LSCAPE_TRACE_PLUGINS"):
        print(f"[lscape trace] {hook_name} -> {impl.plugin_name}", file=sys.stderr)
    impl.function(**args)


def _named_registrar(table: dict[str, Entry], source: str, hook_name: str) -> Callable:
    def register(name: str, obj: Any, help: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{hook_name}: a name must be a non-empty string")
        if name in table and table[name].source != source:
            raise UsageError(
                f"'{name}' is registered twice, by {table[name].source} and {source}; uninstall one of them"
            )
        table[name] = Entry(name, obj, help or first_line(obj), source)

    return register


def _class_registrar(reg: Registry, table: dict[str, Entry], source: str) -> Callable:
    def register(cls: type) -> None:
        name = getattr(cls, "name", None)
        if not name:
            raise TypeError(f"plugin class {cls!r} has no `name`")
        clash = reg.activatable().get(name)
        if clash is not None and clash.obj is not cls:
            raise UsageError(
                f"plugin name '{name}' is registered twice, by {clash.source} and {source}; uninstall one of them"
            )
        table[name] = Entry(name, cls, getattr(cls, "help", "") or first_line(cls), source)

    return register


def first_line(obj: Any) -> str:
    """The first line of ``obj``'s docstring (empty without one)."""
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    def before(hook_name, hook_impls, kwargs):
        shown = {k: _short(v) for k, v in kwargs.items()}
        print(f"[lscape trace] {hook_name}({shown}) -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

    def after(outcome, hook_name, hook_impls, kwargs):
        try:
            result = outcome.get_result()
        except BaseException as e:  # the engine reports it; the trace only shows it
            result = f"raised {type(e).__name__}: {e}"
        if result not in (None, []):
            print(f"[lscape trace] {hook_name} returned {_short(result)}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
