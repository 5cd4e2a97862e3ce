"""Feature taps: read intermediate activations by module path, through forward hooks.

A teacher's code is never edited to expose a layer: a config names the module path
(`net.features.3`, as `model.named_modules()` spells it) and a hook records its output.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class TapError(ValueError):
    """A module path that does not exist, or an output that is not a tensor."""


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    modules = dict(model.named_modules())
    if path not in modules or not path:
        listing = ", ".join(module_paths(model)) or "(none)"
        raise TapError(f"{role} has no module at path {path!r}; module paths that exist: {listing}")
    return modules[path]


class FeatureTap:
    """Records the outputs of the named modules on every forward pass of `model`.

    Use as a context manager (hooks are removed on exit) or call `close()`. `features`
    holds the outputs of the last forward, keyed by path.
    """

    def __init__(self, model: nn.Module, paths: list[str] | tuple[str, ...], role: str = "model"):
        self.paths = tuple(dict.fromkeys(paths))
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            module = resolve(model, path, role)
            self._handles.append(module.register_forward_hook(self._hook(path, role)))

    def _hook(self, path: str, role: str):
        def record(module: nn.Module, inputs, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise TapError(f"{role} module {path!r} returns {type(output).__name__}, not a tensor")
            self.features[path] = output

        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def tapped(model: nn.Module, paths: list[str], role: str = "model") -> Iterator[FeatureTap]:
    tap = FeatureTap(model, paths, role)
    try:
        yield tap
    finally:
        tap.close()


@torch.no_grad()
def probe_shapes(
    model: nn.Module, paths: list[str], example: torch.Tensor, role: str = "model"
) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each path on one example batch, to size connectors."""
    with tapped(model, paths, role) as tap:
        model(example)
        return {p: tuple(tap.features[p].shape[1:]) for p in paths}
