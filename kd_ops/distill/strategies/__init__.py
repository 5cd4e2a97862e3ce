"""Training strategies, one file each, found by name in one registry (`STRATEGIES`).

`distill.method` names a strategy (`mutual`, `born_again`, `data_free`, `sklearn`, `none`) or a loss (`kd`,
`dkd`, `hint`, ...), which is the plain `loss_terms` strategy with that loss. `strategy_for`
answers both; the pipeline asks it and branches on no name. Register your own with
`@register_strategy("name")` on a `Strategy` subclass (see `kd_ops.distill.strategies.strategy`),
or from an installed package through the entry-point group `kd_ops.strategies` (`kd_ops.core.plugins`).
"""

from __future__ import annotations

from kd_ops.core.registry import UnknownComponentError
from kd_ops.distill.losses import LOSSES
from kd_ops.distill.strategies import born_again, data_free, mutual, scikit_learn  # noqa: F401  (registration)
from kd_ops.distill.strategies.loss_terms import LabelsOnly, LossTerms
from kd_ops.distill.strategies.strategy import STRATEGIES, Strategy, StudentTrainer, register_strategy


def method_names() -> list[str]:
    """Every name `distill.method` takes: the strategies and the losses."""
    return sorted({*STRATEGIES.names(), *LOSSES.names()})


def strategy_class(method: str) -> type[Strategy]:
    """The strategy behind `distill.method: method`; `UnknownComponentError` listing every name.

    Built-ins are answered without loading plugins; then the `kd_ops.strategies` and
    `kd_ops.losses` entry points are tried (a refused plugin raises `PluginError`)."""
    if STRATEGIES.holds(method):
        return STRATEGIES.get(method)
    if LOSSES.holds(method):
        return LossTerms
    if method in STRATEGIES:
        return STRATEGIES.get(method)
    if method in LOSSES:
        return LossTerms
    refused = [*STRATEGIES.plugin_errors.values(), *LOSSES.plugin_errors.values()]
    raise UnknownComponentError("method", method, method_names(), refused)


def strategy_for(method_cfg) -> Strategy:
    """The strategy that trains students of this `distill` section."""
    return strategy_class(method_cfg.method)(method_cfg)


__all__ = [
    "STRATEGIES",
    "LabelsOnly",
    "LossTerms",
    "Strategy",
    "StudentTrainer",
    "method_names",
    "register_strategy",
    "strategy_class",
    "strategy_for",
]
