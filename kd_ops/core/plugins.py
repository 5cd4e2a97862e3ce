"""Components from installed packages: entry points, loaded on the first name kd-ops does not know.

A config never imports code by a string. A package the user installed is code they chose to run,
so it may add components: it declares entry points in one group per kind, and a config then names
them like any built-in.

| group | registry | the entry point names |
| --- | --- | --- |
| `kd_ops.datasets` | `DATASETS` | a module (or object) whose import runs `@register_dataset(NAME)` |
| `kd_ops.models` | `MODELS` | a module (or object) whose import runs `@register_model(NAME, Params)` |
| `kd_ops.losses` | `LOSSES` | a module (or object) whose import runs `@register_loss(NAME)` |
| `kd_ops.strategies` | `STRATEGIES` | a module (or object) whose import runs `@register_strategy(NAME)` |
| `kd_ops.alert_hooks` | (none: `monitors.alerts`) | a class or factory called with the hook's params |

NAME is the entry point's own name. kd-ops imports the entry point's value (`module` or
`module:attr`) and then checks that the registry holds NAME; so one convention covers every kind
and the component is registered exactly as built-ins are, with its params schema.

Loading is lazy and once per registry: only when a lookup misses (or when the known names are
listed, e.g. in an error message), never at `import kd_ops` nor for a config that uses built-ins.
A plugin is refused, with a message naming its distribution, its entry point and why, when it
fails to import, when importing it registers no component under its entry point's name, when its
name is built in (or already taken), or when it registers names no entry point declares. One
broken plugin does not hide the others: the error is raised when its own name is looked up.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import TYPE_CHECKING, Any, Iterator

from kd_ops.core.errors import ConfigError, first_line

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

log = logging.getLogger(__name__)

# registry kind -> entry-point group (a `Registry` of one of these kinds reads its group)
GROUPS: dict[str, str] = {
    "dataset": "kd_ops.datasets",
    "model": "kd_ops.models",
    "loss": "kd_ops.losses",
    "strategy": "kd_ops.strategies",
}
ALERT_HOOKS = "kd_ops.alert_hooks"

# Modules holding the built-in components of those kinds: imported before any plugin, so that
# whatever a plugin's import registers is known to come from the plugin.
BUILTIN_MODULES = (
    "kd_ops.data.datasets",
    "kd_ops.models.zoo",
    "kd_ops.distill.losses",
    "kd_ops.distill.strategies",
)

_loading: list[str] = []  # the distribution whose entry point is being imported, innermost last


class PluginError(ConfigError):
    """An installed plugin that cannot be used: names its distribution, entry point and reason."""


def current_origin() -> str | None:
    """The distribution being loaded, when a registration happens inside a plugin's import."""
    return _loading[-1] if _loading else None


@contextlib.contextmanager
def loading(origin: str) -> Iterator[None]:
    _loading.append(origin)
    try:
        yield
    finally:
        _loading.pop()


def distribution(ep: EntryPoint) -> str:
    """`name version` of the distribution declaring `ep` (or `?` when its metadata says nothing)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?"
    return f"{dist.metadata['Name'] or dist.name} {dist.version}"


def describe(ep: EntryPoint) -> str:
    return f"entry point `{ep.name} = {ep.value}` in group {ep.group} of distribution {distribution(ep)}"


def installed(group: str) -> list[EntryPoint]:
    """The entry points of `group` of every installed distribution, by name (stable order)."""
    from importlib.metadata import entry_points  # only when a plugin is looked for

    return sorted(entry_points(group=group), key=lambda ep: (ep.name, distribution(ep)))


def load_plugins(registry: Any) -> None:
    """Import every entry point of the registry's group once; record each refusal by name.

    `registry` is a `kd_ops.core.registry.Registry` (not imported here: the registry imports this)."""
    if registry.group is None or registry.plugins_loaded:
        return
    registry.plugins_loaded = True  # first: a plugin's import may itself look names up
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    kind, group = registry.kind, registry.group
    for ep in installed(group):
        origin, where = distribution(ep), describe(ep)
        if ep.name in registry.plugin_errors:
            continue  # already refused (e.g. a second distribution declaring the same name)
        if ep.name in registry.raw_names():
            taken = registry.origin(ep.name)
            if taken is None:
                why = f"{kind} {ep.name!r} is built in (or registered by your code); a plugin never replaces it"
                registry.refuse(ep.name, where, why)
                continue
            if taken != origin or ep.name in registry.declared:
                registry.refuse(ep.name, where, f"{kind} {ep.name!r} is also provided by distribution {taken}")
                continue
            # else: this distribution registered it while an entry point of another group was imported
        else:
            before = set(registry.raw_names())
            with loading(origin):
                try:
                    ep.load()
                except Exception as exc:  # noqa: BLE001 - reported when the name is looked up
                    registry.refuse(ep.name, where, f"failed to import: {type(exc).__name__}: {first_line(exc)}")
                    continue
            if ep.name not in registry.raw_names():
                other = sorted(set(registry.raw_names()) - before)
                got = f" (it registered {', '.join(map(repr, other))})" if other else ""
                why = f"importing it registered no {kind} named {ep.name!r}{got}"
                registry.refuse(ep.name, where, why + "; register it under the entry point's name")
                continue
        registry.declared[ep.name] = origin
    # a name a plugin registered here that no entry point of the group declares is not used
    for name in registry.raw_names():
        origin = registry.origin(name)
        if origin is not None and name not in registry.declared and name not in registry.plugin_errors:
            why = f"it registered {kind} {name!r}, a name no entry point of group {group} declares"
            registry.refuse(name, f"distribution {origin}", why)
    for message in registry.plugin_errors.values():
        log.warning("%s", message)
