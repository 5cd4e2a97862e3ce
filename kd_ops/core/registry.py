"""Name -> component registries.

A config names components (datasets, models, methods); it never imports code. Each kind of
component has one registry, filled by a decorator next to the component's definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T")


class UnknownComponentError(KeyError):
    """Raised for a name that no component registered; the message lists the names that exist."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


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
