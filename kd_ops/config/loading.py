"""The experiment config: one YAML file, validated by pydantic.

Every error a user can make in a config is reported as a `ConfigError` that names the file, the
key (dotted path), the value and what is wrong, so the CLI can print one message and exit 2
instead of a traceback. This module imports no heavy library; the checks that need the component
registries (torch models, datasets) live in `kd_ops.catalog`.
"""

from __future__ import annotations

import copy
import os
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Loading


MAX_CONFIG_BYTES = 1 << 20  # an experiment file is a page of YAML; a bigger one is a mistake or an attack
MAX_CONFIG_VALUES = 100_000  # scalars, lists and mappings after YAML aliases are expanded
MAX_ERROR_LINES = 20

# Bounded at every level, so showing a value costs the same however large it is (an expanded
# alias bomb shares one list a billion times over; a plain repr() would walk every copy).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 50


def _format_value(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expanded_size(root: yaml.Node, limit: int) -> tuple[int, int]:
    """How many values `root` stands for once aliases are expanded (counting up to `limit`), and how
    many distinct nodes it has. Aliases reuse one node object, so each distinct node is sized once:
    linear in the document's size."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(c), 0) for c in children))
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes.get(id(root), 0), len(sizes)


def safe_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, with the expansion of aliases bounded: a few hundred bytes of nested
    anchors (`&a [*b, *b, ...]`) stand for billions of values, and everything that walks the
    result (validation, error messages, MLflow params) would take minutes and gigabytes."""
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded, distinct = _expanded_size(node, MAX_CONFIG_VALUES)
        if distinct > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: holds more than {MAX_CONFIG_VALUES:,} values; an experiment config needs far fewer"
            )
        if expanded > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_CONFIG_VALUES:,} values through YAML aliases (*name); "
                "an experiment config needs far fewer (is it an alias bomb?)"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be an experiment config") from None
    finally:
        loader.dispose()


def _error_lines(err: ValidationError, set_keys: set[str]) -> list[str]:
    lines = []
    errors = err.errors()
    if len(errors) > MAX_ERROR_LINES:
        # One screen of problems is enough to act on; the count says how many more there are.
        rest = len(errors) - MAX_ERROR_LINES
        errors = errors[:MAX_ERROR_LINES]
    else:
        rest = 0
    for e in errors:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        origin = " (from --set)" if loc in set_keys else ""
        if not e["loc"]:  # a check across keys: its message names them
            lines.append(msg)
            continue
        lines.append(f"{loc} = {_format_value(value)}{origin}: {msg}")
    if rest:
        lines.append(f"... and {rest} more problems")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 0.5 is a float, [1,2] a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set distill.temperature=2")
    try:
        value = safe_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> tuple[dict[str, Any], set[str]]:
    data = copy.deepcopy(raw)
    keys: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(path[: i + 1])
                raise ConfigError(f"{source}: --set {text!r}: {prefix} is {child!r}, not a section")
            node = child
        node[path[-1]] = value
        keys.add(".".join(path))
    return data, keys


def config_from_dict(raw: Any, source: str = "<dict>", set_keys: set[str] | None = None) -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = _error_lines(err, set_keys or set())
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None
    from kd_ops.catalog import check_components, is_table, with_table_defaults  # imports the registries (torch)
    from kd_ops.distill.recipes import with_recipe

    table = is_table(cfg)
    cfg = with_recipe(with_table_defaults(cfg, table), table)
    check_components(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate one experiment file; raises ConfigError for anything wrong."""
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as fh:  # one byte past the limit is enough to know: a pipe has no size
            data = fh.read(MAX_CONFIG_BYTES + 1)
            size = os.fstat(fh.fileno()).st_size if len(data) > MAX_CONFIG_BYTES else 0
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        shown = f"{size:,} bytes, over" if size > MAX_CONFIG_BYTES else "over"
        raise ConfigError(
            f"config {source} is {shown} the limit of {MAX_CONFIG_BYTES:,}: an experiment config is a page of YAML"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config {source} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
            f"(offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        raw = safe_yaml(text, source)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw, set_keys = apply_overrides(raw or {}, overrides or [], source)
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        # A table file named in a config is found beside it, wherever the command runs from.
        data["path"] = str((path.parent / data["path"]).resolve())
    return config_from_dict(raw, source, set_keys)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
