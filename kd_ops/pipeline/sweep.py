"""A grid of distillations: which settings to try, and how they ranked.

`--grid distill.temperature=2,4 --grid seed=0,1` is the product of the values: four cells, each
a `--set` list applied on top of the config. Values are read as YAML, so `2` is a number and
`[16,16]` a list (write lists with brackets: the comma separates values only outside brackets).
Running the cells in parallel is orchestration (`flows/sweep.py`); this module holds the grid
and the ranking.
"""

from __future__ import annotations

import itertools
from typing import Any

import yaml

from kd_ops.core.errors import ConfigError


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `1,[2,3],'a,b'` -> 3 values."""
    out, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(current)
            current = ""
            continue
        current += ch
    out.append(current)
    return [v.strip() for v in out]


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """`["key=v1,v2", ...]` -> {key: [v1, v2]}; a key twice or an empty value is an error naming it."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,..., e.g. --grid distill.temperature=2,4,8")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; put all its values in one --grid")
        parsed = []
        for v in _split_values(values):
            if not v:
                raise ConfigError(f"--grid {spec!r}: an empty value")
            try:
                parsed.append(yaml.safe_load(v))
            except yaml.YAMLError as exc:
                raise ConfigError(f"--grid {key}: {v!r} is not a YAML value ({exc.problem})") from None
        grid[key] = parsed
    if not grid:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2")
    return grid


def cells(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in a stable order (the first key varies slowest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def as_overrides(cell: dict[str, Any]) -> list[str]:
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in cell.items()
    ]


def rank(results: list[dict[str, Any]], metric: str, higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Cells best first by the student's `metric`; cells that failed or lack it come last."""

    def key(r: dict[str, Any]) -> tuple[int, float]:
        value = r.get("metrics", {}).get(metric)
        if value is None:
            return (1, 0.0)
        return (0, -value if higher_is_better else value)

    return sorted(results, key=key)


def table(ranked: list[dict[str, Any]], metric: str, columns: tuple[str, ...]) -> str:
    """A Markdown table: rank, the cell's settings, the metric and a few more, the run."""
    keys = list(ranked[0]["cell"]) if ranked else []
    head = ["rank", *keys, metric, *[c for c in columns if c != metric], "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, r in enumerate(ranked, 1):
        m = r.get("metrics", {})
        shown = [metric, *[c for c in columns if c != metric]]
        values = [f"{m[c]:.4f}" if isinstance(m.get(c), (int, float)) else "-" for c in shown]
        run = r.get("run_id") or f"failed: {r.get('error', '?')}"
        lines.append("| " + " | ".join([str(i), *[str(r["cell"][k]) for k in keys], *values, run]) + " |")
    return "\n".join(lines)
