"""Name -> component registries.

A config names components (datasets, models, methods); it never imports code. Each kind of
component has one registry, filled by a decorator next to the component's definition, and, for
datasets, models, losses and strategies, by installed packages' entry points
(`kd_ops.core.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from kd_ops.core import plugins

T = TypeVar("T")


class UnknownComponentError(KeyError):
    """Raised for a name that no component registered; the message lists the names that exist
    (plugins included) and any installed plugin that was refused."""

    def __init__(self, kind: str, name: str, known: list[str], refused: list[str] | None = None):
        self.kind, self.name, self.known, self.refused = kind, name, known, list(refused or [])
        message = f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}"
        if self.refused:
            message += "; refused plugins: " + "; ".join(self.refused)
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class Registry(Generic[T]):
    """Names -> components of one kind.

    A registry of a kind in `kd_ops.core.plugins.GROUPS` (or given `group=`) also holds the
    components installed packages declare in that entry-point group: they are imported on the
    first lookup of a name it does not hold, or when its names are listed (`kd_ops.core.plugins`).
    """

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group or plugins.GROUPS.get(kind)
        self._items: dict[str, T] = {}
        self._origin: dict[str, str | None] = {}  # name -> the plugin distribution that registered it
        self.plugins_loaded = False
        self.declared: dict[str, str] = {}  # plugin names accepted -> their distribution
        self.plugin_errors: dict[str, str] = {}  # plugin names refused -> why

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._origin[name] = plugins.current_origin()
            return obj

        return decorator

    # -- lookups ---------------------------------------------------------------------------
    def _usable(self, name: str) -> bool:
        """Held, and either not from a plugin or from one whose entry point was accepted."""
        if name not in self._items:
            return False
        if self.group is None or self._origin[name] is None:
            return True
        return self.plugins_loaded and name in self.declared and name not in self.plugin_errors

    def _load(self) -> None:
        plugins.load_plugins(self)

    def _refused(self, name: str) -> None:
        if name in self.plugin_errors:
            raise plugins.PluginError(self.plugin_errors[name])

    def get(self, name: str) -> T:
        """The component named `name`: a built-in, or else an installed plugin's (loaded now).
        `UnknownComponentError` lists the known names; `PluginError` says why a plugin was refused."""
        if not self._usable(name):
            self._load()
            if not self._usable(name):
                self._refused(name)
                raise UnknownComponentError(self.kind, name, self.names(), list(self.plugin_errors.values()))
        return self._items[name]

    def holds(self, name: str) -> bool:
        """Whether `name` is usable now, without loading any plugin."""
        return self._usable(name)

    def names(self) -> list[str]:
        """Every usable name, installed plugins included (this loads them)."""
        self._load()
        return sorted(n for n in self._items if self._usable(n))

    def raw_names(self) -> list[str]:
        """Every registered name, refused plugins' included (for `kd_ops.core.plugins`)."""
        return list(self._items)

    def origin(self, name: str) -> str | None:
        """The plugin distribution that registered `name`; None for kd-ops' own and your code's."""
        return self._origin.get(name)

    def refuse(self, name: str, where: str, why: str) -> None:
        self.plugin_errors[name] = f"{self.kind} plugin {name!r} refused: {where}: {why}"

    def __contains__(self, name: object) -> bool:
        """`name in registry`: loads plugins on a miss; a refused plugin's name raises `PluginError`."""
        if not isinstance(name, str):
            return False
        if self._usable(name):
            return True
        self._load()
        self._refused(name)
        return self._usable(name)


@dataclass(frozen=True)
class Entry:
    """A component built from typed params: `params` is a pydantic schema, `build` the factory.

    The schema lets a config error name the exact key (`student.params.hidden`) before anything
    is built.
    """

    params: type
    build: Callable[..., Any]


def entry_decorator(registry: "Registry[Entry]", name: str, params: type):
    """`@decorator` registering the decorated factory under `name` with its params schema."""

    def decorator(build):
        registry.register(name)(Entry(params, build))
        return build

    return decorator


def param_errors(schema: type[BaseModel], params: dict[str, Any], key: str, what: str) -> list[str]:
    """Each problem of `params` against a component's schema, one line naming `key.<param>`."""
    try:
        schema.model_validate(params)
    except ValidationError as err:
        out = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            value = e.get("input") if e["type"] != "missing" else "(missing)"
            out.append(f"{key}.{loc} = {value!r}: {msg} ({what})")
        return out
    return []
