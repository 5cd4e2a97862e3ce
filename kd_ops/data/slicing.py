"""Slices that are a function of the inputs alone.

Evaluation, the served model and the monitors must cut traffic the same way, or a slice that
decays in production cannot be compared with the same slice at distillation time. So the cut
points are learnt once from the training split, stored with the student (`slices.json` in its
run) and applied by the server to every row it answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SLICES_ARTIFACT = "slices.json"
INK_LEVELS = ("low", "mid", "high")


@dataclass(frozen=True)
class InputSlices:
    """Ink-intensity terciles: mean pixel value cut at the training split's 1/3 and 2/3 quantiles."""

    ink_edges: tuple[float, float]

    @classmethod
    def fit(cls, x: np.ndarray) -> "InputSlices":
        lo, hi = np.quantile(np.asarray(x).mean(axis=1), [1 / 3, 2 / 3])
        return cls((float(lo), float(hi)))

    def compute(self, x: np.ndarray) -> dict[str, np.ndarray]:
        ink = np.digitize(np.asarray(x).mean(axis=1), self.ink_edges)
        return {"ink": np.asarray(INK_LEVELS)[ink]}

    @property
    def names(self) -> tuple[str, ...]:
        return ("ink",)

    def to_dict(self) -> dict[str, Any]:
        return {"ink": {"edges": list(self.ink_edges), "levels": list(INK_LEVELS), "of": "mean of the row"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "InputSlices":
        lo, hi = raw["ink"]["edges"]
        return cls((float(lo), float(hi)))


MAX_SLICE_LEVELS = 20  # a categorical slice column reports its most frequent values; the rest are "other"


@dataclass(frozen=True)
class ColumnSlices:
    """A table's slices: the user's slice columns (`data.slices`), cut the same way everywhere.

    A categorical column's slice is its value (the 20 most frequent in training; the rest are
    "other"); a numeric column's is its training tercile (low, mid, high); a boolean's "true" or
    "false"; a missing or unseen value is "missing"; a text column's is the tercile of its length
    in tokens ("empty" for no text). Computed from the encoded rows, so the
    server, the evaluation and the monitors cut by the same stored positions and cut points."""

    columns: tuple[dict[str, Any], ...]  # {"name", "position", "kind", "levels" or "edges"}

    @classmethod
    def fit(cls, schema: Any, x_train: np.ndarray) -> "ColumnSlices":
        out = []
        for name in schema.slices:
            j = schema.position(name)
            col = schema.column(name)
            entry: dict[str, Any] = {"name": name, "position": j, "kind": col.kind}
            if col.kind == "categorical":
                entry["levels"] = list(col.categories[:MAX_SLICE_LEVELS])
            elif col.kind == "numeric":
                v = x_train[:, j]
                v = v[~np.isnan(v)]
                lo, hi = np.quantile(v, [1 / 3, 2 / 3]) if len(v) else (0.0, 0.0)
                entry["edges"] = [float(lo), float(hi)]
            elif col.kind == "text":  # the text's length in tokens, by training tercile
                from kd_ops.data.text import token_counts

                entry["width"] = col.max_length
                v = token_counts(x_train[:, j : j + col.max_length]).astype(np.float64)
                lo, hi = np.quantile(v, [1 / 3, 2 / 3]) if len(v) else (0.0, 0.0)
                entry["edges"] = [float(lo), float(hi)]
            out.append(entry)
        return cls(tuple(out))

    def compute(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        out: dict[str, np.ndarray] = {}
        for c in self.columns:
            if c["kind"] == "text":
                from kd_ops.data.text import token_counts

                n = token_counts(x[:, c["position"] : c["position"] + c["width"]])
                levels = np.asarray([*INK_LEVELS, "empty"], dtype=object)
                out[c["name"]] = levels[np.where(n == 0, 3, np.digitize(n, c["edges"]))].astype(str)
                continue
            v = x[:, c["position"]]
            missing = np.isnan(v)
            if c["kind"] == "categorical":
                levels = np.asarray([*c["levels"], "other", "missing"], dtype=object)
                code = np.where(missing, -1, v).astype(np.int64)
                idx = np.where(code < 0, len(levels) - 1, np.minimum(code, len(levels) - 2))
                values = levels[idx]
            elif c["kind"] == "numeric":
                values = np.asarray([*INK_LEVELS, "missing"], dtype=object)[
                    np.where(missing, 3, np.digitize(np.where(missing, 0, v), c["edges"]))
                ]
            else:
                values = np.where(missing, "missing", np.where(v > 0.5, "true", "false")).astype(object)
            out[c["name"]] = values.astype(str)
        return out

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c["name"] for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "columns", "columns": [dict(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ColumnSlices":
        return cls(tuple(dict(c) for c in raw["columns"]))


Slicer = InputSlices | ColumnSlices


def slicer_from_dict(raw: dict[str, Any]) -> Slicer:
    """The slicer stored with a student (`slices.json`): a table's columns, or ink terciles."""
    return ColumnSlices.from_dict(raw) if raw.get("kind") == "columns" else InputSlices.from_dict(raw)
