"""Which Host headers a server answers: the bound host, loopback names, --allowed-host (DNS rebinding)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Sequence

from kd_ops.core.errors import ConfigError
from kd_ops.serving.schemas import RequestError, _json_response

# -- the Host header: which names this server answers to -------------------------------------
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _canonical(name: str) -> str:
    if ":" in name:  # IPv6: one spelling per address ([0:0:0:0:0:0:0:1] is ::1)
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            return name
    return name


def _host_name(value: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lowercase, or None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return None
    name = name.removesuffix(".")
    if not name or any(c.isspace() or c in "/@\\" for c in name):
        return None
    return _canonical(name)


def host_policy(bound: str, allowed: Sequence[str] = ()) -> frozenset[str] | None:
    """The names the Host header may carry (with any port), or None for any: the bound host, every
    `--allowed-host`, and the loopback names when bound to a loopback address. Bound to a wildcard
    (0.0.0.0, ::) the server cannot know its names: `--allowed-host` is required ('*': any)."""
    names = set()
    for entry in allowed:
        name = entry.strip().lower()
        if name == "*":
            return None
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            name = name.removesuffix(".")
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", name):
                raise ConfigError(
                    f"--allowed-host {entry!r}: give a host name or an IP address, without port or scheme"
                ) from None
        names.add(name)
    bound_name = bound.strip().strip("[]").lower()
    if bound_name in WILDCARD_HOSTS:
        if not names:
            raise ConfigError(
                f"--host {bound}: listening on every interface needs the names clients reach it by:"
                " --allowed-host NAME (repeatable; '*' accepts any Host header)"
            )
        return frozenset(names)
    names.add(_canonical(bound_name))
    try:
        loopback = ipaddress.ip_address(bound_name).is_loopback
    except ValueError:
        loopback = bound_name == "localhost"
    return frozenset(names | LOOPBACK_NAMES) if loopback else frozenset(names)


class HostGuard:
    """ASGI middleware: a request whose Host header is not an allowed name gets a 400 before any
    route sees it (DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name)."""

    def __init__(self, app: Any, allowed: frozenset[str] | None, drain_bytes: int):
        self.app, self.allowed, self.drain_bytes = app, allowed, drain_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        hosts = [v for k, v in scope["headers"] if k == b"host"]
        name = _host_name(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
        if name is not None and name in self.allowed:
            return await self.app(scope, receive, send)
        # Read the body first (bounded): closing a socket with unread bytes resets it, and the client
        # would never see the answer.
        size = 0
        while size <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        given = hosts[0].decode("latin-1") if len(hosts) == 1 else f"{len(hosts)} Host headers"
        shown = given if len(given) <= 80 else given[:77] + "..."
        why = f"Host: {shown!r} is not a name this server answers to (kd-ops serve --allowed-host)"
        response = _json_response(RequestError(400, "Host", why).body(), 400)
        await response(scope, receive, send)
