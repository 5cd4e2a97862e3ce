"""Users' own tables: typed columns, a schema fitted on the training split, and its lossless encoding.

Everything inside kd-ops (training loaders, teacher caches, evaluation, the prediction log's
window reads) works on one float32 matrix per table, the *encoded* rows: numeric and boolean
columns as their values, categorical columns as the index of the category in the training
split's vocabulary, and NaN wherever a value is missing (or, for a category, was never seen in
training). The encoding is lossless for everything a model was trained on, so

- a network puts its own preprocessing (scaling fitted on the training split, embeddings of the
  category indices, missing values) in front of itself as buffers (`kd_ops.models.tabular`);
- a teacher that takes the user's original DataFrame (a LightGBM or scikit-learn pipeline from
  the user's registry) gets `schema.decode(x)`: the original column names and types back;
- the registered model stores `schema.to_dict()` as JSON beside its weights, and a client sends
  raw records with the original column names (`schema.encode`, which names the column and the
  row of any bad value).

Defined behaviour of awkward values (documented in docs/data.md):
- missing numeric or boolean value -> NaN: networks read the training mean, trees route it as
  they learnt (LightGBM, HistGradientBoosting and scikit-learn trees all take NaN);
- missing category, and a category the training split never held (an *unseen* category at
  serve time) -> NaN: every model treats it as missing; the monitor counts unseen values;
- a category seen fewer than `min_category_count` times in training -> kept in the vocabulary
  (trees and user teachers see it) but shares one "rare" embedding in networks;
- more than `max_categories` distinct values -> the most frequent are kept, the rest are unseen;
- a text column (`data.text`) takes `max_length` slots of the encoded row: its token ids under
  a tokenizer fitted on the training split, padded with 0 (`kd_ops.data.text`, which also says
  what empty, missing, overlong and non-string texts become).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from kd_ops.core.errors import ConfigError

Kind = Literal["numeric", "categorical", "boolean", "text"]
SCHEMA_VERSION = 1
MAX_CATEGORIES = 1000
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})


def close_matches(name: str, names: Iterable[str]) -> str:
    """ " (did you mean 'carrier'?)" or nothing: what a misspelt column name is named with."""
    found = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""


def _row_label(frame: pd.DataFrame, position: int) -> str:
    """How an error names a row: its position counted from 0 (and the index label where it differs)."""
    label = frame.index[position]
    return f"row {position}" if label == position else f"row {position} (index {label!r})"


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python value JSON and responses carry."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class Column:
    """One feature column: its kind, and what the training split taught about it."""

    name: str
    kind: Kind
    categories: tuple[str, ...] = ()  # categorical: the vocabulary, most frequent first
    counts: tuple[int, ...] = ()  # training rows per category (rare ones share an embedding)
    mean: float = 0.0  # numeric and boolean: training mean and std (NaN ignored)
    std: float = 1.0
    missing_share: float = 0.0  # in the training split
    integer: bool = False  # numeric: the user's column held integers (its signature type is long)
    tokenizer: str = field(default="", repr=False)  # text: the tokenizer's own JSON (`tokenizers`)
    max_length: int = 0  # text: tokens kept per text, the slots it takes in an encoded row

    @property
    def width(self) -> int:
        """Slots of the encoded row: one per column, `max_length` for a text column."""
        return self.max_length if self.kind == "text" else 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "missing_share": self.missing_share}
        if self.kind == "categorical":
            out.update(categories=list(self.categories), counts=list(self.counts))
        elif self.kind == "text":
            out.update(tokenizer=self.tokenizer, max_length=self.max_length, mean=self.mean, std=self.std)
        else:
            out.update(mean=self.mean, std=self.std, integer=self.integer)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Column":
        """A stored column back; a text column must carry its tokenizer (a model without it
        could not read a single request) and a positive `max_length`, else a `ValueError` naming it."""
        if raw.get("kind") == "text":
            name = raw.get("name")
            if not raw.get("tokenizer"):
                raise ValueError(f"text column {name!r}: its tokenizer is missing")
            from kd_ops.data.text import tokenizer_from_json

            try:
                tokenizer_from_json(str(raw["tokenizer"]))
            except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception type
                raise ValueError(f"text column {name!r}: its tokenizer cannot be read ({str(exc)[:200]})") from None
            if int(raw.get("max_length", 0)) < 1:
                raise ValueError(f"text column {name!r}: max_length {raw.get('max_length')!r} is not a positive count")
        return cls(
            name=str(raw["name"]),
            kind=raw["kind"],
            categories=tuple(str(c) for c in raw.get("categories", ())),
            counts=tuple(int(c) for c in raw.get("counts", ())),
            mean=float(raw.get("mean", 0.0)),
            std=float(raw.get("std", 1.0)),
            missing_share=float(raw.get("missing_share", 0.0)),
            integer=bool(raw.get("integer", False)),
            tokenizer=str(raw.get("tokenizer", "")),
            max_length=int(raw.get("max_length", 0)),
        )


@dataclass(frozen=True)
class TableSchema:
    """The columns a model takes, in order, and the classes it answers with (the user's labels)."""

    columns: tuple[Column, ...]
    label: str
    classes: tuple[Any, ...]
    time: str | None = None
    slices: tuple[str, ...] = ()
    min_category_count: int = 10
    _index: dict[str, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for c in self.columns:
            if c.kind == "categorical":
                self._index[c.name] = {v: i for i, v in enumerate(c.categories)}
        starts, at = [], 0
        for c in self.columns:
            starts.append(at)
            at += c.width
        object.__setattr__(self, "_starts", tuple(starts))
        object.__setattr__(self, "_width", at)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def position(self, name: str) -> int:
        """Where the column starts in an encoded row (its index, unless a text column precedes it)."""
        return self._starts[self.names.index(name)]

    @property
    def width(self) -> int:
        """Slots of an encoded row: the columns, a text column counting `max_length`."""
        return self._width

    def span(self, j: int) -> slice:
        """The slots of column `j` in an encoded row."""
        return slice(self._starts[j], self._starts[j] + self.columns[j].width)

    def offset(self, j: int) -> int:
        """The slot of column `j` in an encoded row."""
        return self._starts[j]

    def of_kind(self, kind: Kind) -> list[int]:
        """The indices (in `columns`) of the columns of `kind`; `offset(j)` is the slot of each."""
        return [i for i, c in enumerate(self.columns) if c.kind == kind]

    @property
    def has_text(self) -> bool:
        return any(c.kind == "text" for c in self.columns)

    def same_encoding(self, other: "TableSchema") -> bool:
        """Whether rows encoded with `other` mean the same to a model of this schema: the same
        columns of the same kinds, the same vocabularies (category indices), the same classes."""

        def encoding(t: TableSchema) -> list[tuple[Any, ...]]:
            return [(c.name, c.kind, c.categories, c.tokenizer, c.max_length) for c in t.columns]

        return encoding(self) == encoding(other) and tuple(map(_key, self.classes)) == tuple(map(_key, other.classes))

    # -- JSON (stored with every registered model) ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kd_ops_table_schema": SCHEMA_VERSION,
            "label": self.label,
            "classes": [plain_value(c) for c in self.classes],
            "time": self.time,
            "slices": list(self.slices),
            "min_category_count": self.min_category_count,
            "columns": [c.to_dict() for c in self.columns],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TableSchema":
        if raw.get("kd_ops_table_schema") != SCHEMA_VERSION:
            raise ValueError(f"not a kd-ops table schema of version {SCHEMA_VERSION}")
        return cls(
            columns=tuple(Column.from_dict(c) for c in raw["columns"]),
            label=str(raw["label"]),
            classes=tuple(raw["classes"]),
            time=raw.get("time"),
            slices=tuple(raw.get("slices", ())),
            min_category_count=int(raw.get("min_category_count", 10)),
        )

    # -- labels -----------------------------------------------------------------------------------
    def label_index(self, labels: Sequence[Any], where: str = "label") -> np.ndarray:
        """User labels -> class indices; a label the model does not know names its position."""
        lookup = {_key(c): i for i, c in enumerate(self.classes)}
        out = np.empty(len(labels), dtype=np.int64)
        for i, value in enumerate(labels):
            idx = lookup.get(_key(value))
            if idx is None:
                raise ConfigError(f"{where}[{i}] = {value!r}: not one of the model's classes {list(self.classes)[:20]}")
            out[i] = idx
        return out

    # -- records <-> encoded rows ----------------------------------------------------------------
    def encode(self, frame: pd.DataFrame, where: str = "data", strict: bool = False) -> np.ndarray:
        """Raw records -> encoded float32 rows (see the module docstring).

        A missing column names the close matches; a numeric column holding text or a boolean
        column holding anything but true/false names the column and its first offending row.
        With `strict`, a column the model does not take is an error too (serving: a client's
        misspelt field must not pass as a missing one)."""
        return self.encode_counting(frame, where, strict)[0]

    def encode_counting(
        self, frame: pd.DataFrame, where: str = "data", strict: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`encode`, and per text column which rows held a text longer than its `max_length`
        (truncated: the model read its first `max_length` tokens). The server counts them in
        `kd_ops_truncated_texts`, the monitor reports their share."""
        missing = [n for n in self.names if n not in frame.columns]
        if missing:
            first = missing[0]
            more = f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""
            raise ConfigError(
                f"{where}: column {first!r} is missing{close_matches(first, map(str, frame.columns))}{more}"
            )
        if strict:
            unknown = [c for c in frame.columns if c not in self.names]
            if unknown:
                raise ConfigError(
                    f"{where}: unknown column {unknown[0]!r}{close_matches(str(unknown[0]), self.names)}; "
                    f"the model takes {list(self.names)}"
                )
        out = np.empty((len(frame), self.width), dtype=np.float32)
        truncated: dict[str, np.ndarray] = {}
        for j, col in enumerate(self.columns):
            if col.kind == "text":
                from kd_ops.data.text import encode_texts, text_values, tokenizer_from_json

                texts = text_values(frame[col.name], f"{where}: column {col.name!r}")
                out[:, self.span(j)], cut = encode_texts(tokenizer_from_json(col.tokenizer), texts, col.max_length)
                truncated[col.name] = cut
            else:
                out[:, self.offset(j)] = self._encode_column(frame, col, where)
        return out, truncated

    def tokenizer(self, name: str) -> Any:
        """The `tokenizers.Tokenizer` of text column `name`."""
        from kd_ops.data.text import tokenizer_from_json

        return tokenizer_from_json(self.column(name).tokenizer)

    def _encode_column(self, frame: pd.DataFrame, col: Column, where: str) -> np.ndarray:
        values = frame[col.name]
        if col.kind == "numeric":
            return numeric_values(values, frame, f"{where}: column {col.name!r}")
        if col.kind == "boolean":
            return boolean_values(values, frame, f"{where}: column {col.name!r}")
        index = self._index[col.name]
        keys = category_keys(values)
        codes = keys.map(index)
        return codes.to_numpy(dtype=np.float32, na_value=np.nan)

    def unseen(self, frame: pd.DataFrame) -> dict[str, int]:
        """Per categorical column, how many non-missing values the training split never held."""
        out = {}
        for col in self.columns:
            if col.kind == "categorical" and col.name in frame.columns:
                keys = category_keys(frame[col.name])
                out[col.name] = int((keys.notna() & ~keys.isin(self._index[col.name].keys())).sum())
        return out

    def decode(self, x: np.ndarray) -> pd.DataFrame:
        """Encoded rows -> a DataFrame with the original column names and types: numeric as float,
        boolean as pandas' nullable boolean, categorical as `category` with the training
        vocabulary (what LightGBM, XGBoost and scikit-learn pipelines take)."""
        x = np.asarray(x, dtype=np.float32)
        data: dict[str, Any] = {}
        for j, col in enumerate(self.columns):
            if col.kind == "text":
                from kd_ops.data.text import decode_texts

                data[col.name] = pd.Series(decode_texts(self.tokenizer(col.name), x[:, self.span(j)]), dtype=object)
                continue
            v = x[:, self.offset(j)]
            if col.kind == "numeric":
                data[col.name] = v.astype(np.float64)
            elif col.kind == "boolean":
                data[col.name] = pd.array(np.where(np.isnan(v), None, v > 0.5), dtype="boolean")
            else:
                codes = np.where(np.isnan(v), -1, v).astype(np.int64)
                data[col.name] = pd.Categorical.from_codes(codes, categories=list(col.categories))
        return pd.DataFrame(data)


def _key(value: Any) -> Any:
    """Labels compare as the user wrote them, but 1, 1.0 and np.int64(1) are one label."""
    value = plain_value(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def category_keys(values: pd.Series) -> pd.Series:
    """Category values as strings (1 and "1" are one category); missing stays missing."""
    out = values.astype("object")
    mask = out.isna()
    out = out.map(lambda v: v if isinstance(v, str) else (str(_key(v)) if not isinstance(v, bool) else str(v).lower()))
    return out.where(~mask, None)


def numeric_values(values: pd.Series, frame: pd.DataFrame, where: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(values):
        return values.astype(np.float32).to_numpy()
    if pd.api.types.is_numeric_dtype(values):
        out = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        parsed = pd.to_numeric(values, errors="coerce")
        bad = parsed.isna() & values.notna() & ~values.astype("object").map(_blank)
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            raise ConfigError(
                f"{where} is numeric but {_row_label(frame, pos)} holds {values.iloc[pos]!r} "
                f"({int(bad.sum())} such row(s)); fix the value, or declare the column in data.categorical"
            )
        out = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(out).any():
        pos = int(np.flatnonzero(np.isinf(out))[0])
        raise ConfigError(f"{where}: {_row_label(frame, pos)} holds an infinite value")
    return out.astype(np.float32)


def _blank(v: Any) -> bool:
    return isinstance(v, str) and not v.strip()


def boolean_values(values: pd.Series, frame: pd.DataFrame, where: str) -> np.ndarray:
    def one(v: Any) -> float:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return np.nan
        if isinstance(v, (bool, np.bool_)):
            return float(v)
        if isinstance(v, (int, np.integer, float)) and v in (0, 1):
            return float(v)
        if isinstance(v, str) and v.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return float(v.strip().lower() in TRUE_WORDS)
        raise ValueError(v)

    out = np.empty(len(values), dtype=np.float32)
    for i, v in enumerate(values.astype("object").tolist()):
        try:
            out[i] = one(v)
        except ValueError:
            raise ConfigError(
                f"{where} is boolean but {_row_label(frame, i)} holds {v!r}; booleans are true/false, 1/0 or yes/no"
            ) from None
    return out


# -- reading and describing a table -----------------------------------------------------------------


def read_table_file(path: str | Path, key: str = "data.path") -> pd.DataFrame:
    """A CSV or Parquet file (pyarrow) as a DataFrame; a missing or unreadable file is one error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key} = {str(path)!r}: no such file")
    suffix = (
        "".join(p.suffixes[-2:]).lower() if p.suffix.lower() in (".gz", ".bz2", ".zst", ".xz") else p.suffix.lower()
    )
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p, engine="pyarrow")
        if suffix.startswith(".csv") or suffix.startswith(".tsv") or suffix == ".txt":
            return pd.read_csv(p, sep="\t" if suffix.startswith(".tsv") else ",", low_memory=False)
    except Exception as exc:  # noqa: BLE001 - pandas and pyarrow raise many types for a bad file
        from kd_ops.core.errors import first_line

        raise ConfigError(f"{key} = {str(path)!r}: cannot read it as a table: {first_line(exc)}") from None
    raise ConfigError(
        f"{key} = {str(path)!r}: a table is a .csv, .tsv or .parquet file, got {p.suffix or 'no suffix'!r}"
    )


def infer_kind(values: pd.Series) -> Kind:
    """bool dtype -> boolean; numbers -> numeric; anything else (text, pandas category) -> categorical."""
    if pd.api.types.is_bool_dtype(values):
        return "boolean"
    if pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype, pd.CategoricalDtype):
        return "numeric"
    return "categorical"


@dataclass
class TableSpec:
    """What the user says about a table (config keys `data.*`, or the same as keyword arguments)."""

    label: str
    features: list[str] | None = None
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    boolean: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # free text, tokenised (kd_ops.data.text)
    time: str | None = None
    slices: list[str] = field(default_factory=list)
    split: Literal["random", "time"] = "random"
    drop: list[str] = field(default_factory=list)  # columns that are never features (ids, leaks)
    max_length: int = 128  # text: tokens kept per text
    vocab_size: int = 8000  # text: the tokenizer's vocabulary


def check_columns(frame: pd.DataFrame, spec: TableSpec, where: str) -> list[str]:
    """The feature columns in order; every named column must exist (close matches named)."""
    columns = [str(c) for c in frame.columns]
    frame.columns = columns

    def need(name: str, key: str) -> None:
        if name not in columns:
            raise ConfigError(f"{key} = {name!r}: no such column in {where}{close_matches(name, columns)}")

    need(spec.label, "data.label")
    if spec.time:
        need(spec.time, "data.time")
    for key in ("features", "categorical", "numeric", "boolean", "text", "slices", "drop"):
        for i, name in enumerate(getattr(spec, key) or []):
            need(name, f"data.{key}.{i}")
    typed = {"categorical": spec.categorical, "numeric": spec.numeric, "boolean": spec.boolean, "text": spec.text}
    seen: dict[str, str] = {}
    for key, names in typed.items():
        for name in names:
            if name in seen:
                raise ConfigError(f"data.{key}: column {name!r} is also in data.{seen[name]}")
            seen[name] = key
    not_features = {spec.label, *(spec.drop or [])} | ({spec.time} if spec.time else set())
    if spec.features is not None:
        for bad in [f for f in spec.features if f in not_features]:
            raise ConfigError(f"data.features: {bad!r} is the label, the time column or dropped, not a feature")
        features = list(spec.features)
    else:
        features = [c for c in columns if c not in not_features]
    if not features:
        raise ConfigError(f"data.features: {where} has no feature column besides the label")
    for i, name in enumerate(spec.slices):
        if name not in features:
            raise ConfigError(
                f"data.slices.{i} = {name!r}: a slice column must be a feature, so the server can cut "
                "live traffic by it (features are " + ", ".join(features[:12]) + ")"
            )
    return features


def fit_schema(
    frame: pd.DataFrame,
    spec: TableSpec,
    features: list[str],
    train: np.ndarray,
    classes: tuple[Any, ...],
    where: str,
    min_category_count: int = 10,
) -> TableSchema:
    """Column kinds (inferred, overridden by the spec) and statistics of the training rows."""
    overrides = {
        **{n: "categorical" for n in spec.categorical},
        **{n: "numeric" for n in spec.numeric},
        **{n: "boolean" for n in spec.boolean},
        **{n: "text" for n in spec.text},
    }
    cols = []
    rows = frame.iloc[train]
    for name in features:
        kind = overrides.get(name) or infer_kind(frame[name])
        values = rows[name]
        missing = float(values.isna().mean()) if len(values) else 0.0
        if kind == "text":
            cols.append(_fit_text(values, name, spec, where, missing))
        elif kind == "categorical":
            counts = category_keys(values).value_counts(dropna=True)
            counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable").head(MAX_CATEGORIES)
            cols.append(
                Column(
                    name,
                    "categorical",
                    tuple(counts.index),
                    tuple(int(c) for c in counts.to_numpy()),
                    missing_share=missing,
                )
            )
        else:
            convert = numeric_values if kind == "numeric" else boolean_values
            v = convert(frame[name], frame, f"{where}: column {name!r}")[train]
            finite = v[~np.isnan(v)]
            mean = float(finite.mean()) if len(finite) else 0.0
            std = float(finite.std()) if len(finite) > 1 else 1.0
            integer = kind == "numeric" and pd.api.types.is_integer_dtype(frame[name])
            std = std if std > 1e-12 else 1.0
            cols.append(Column(name, kind, mean=mean, std=std, missing_share=missing, integer=integer))
    return TableSchema(tuple(cols), spec.label, classes, spec.time, tuple(spec.slices), min_category_count)


def _fit_text(values: pd.Series, name: str, spec: TableSpec, where: str, missing: float) -> Column:
    """A text column: its tokenizer learnt from the training rows, and their length in tokens."""
    from kd_ops.data.text import encode_texts, text_values, token_counts, train_tokenizer

    texts = text_values(values, f"{where}: column {name!r}")
    if not any(t.strip() for t in texts):
        raise ConfigError(f"data.text: column {name!r} holds no text in the training split")
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    raw = tokenizer.to_str()
    lengths = token_counts(encode_texts(tokenizer, texts, spec.max_length)[0]).astype(np.float64)
    return Column(
        name,
        "text",
        mean=float(lengths.mean()),
        std=float(lengths.std()) or 1.0,
        missing_share=missing,
        tokenizer=raw,
        max_length=int(spec.max_length),
    )


def label_classes(labels: pd.Series, where: str) -> tuple[tuple[Any, ...], np.ndarray]:
    """The user's classes (sorted) and each row's class index; missing labels or one class are errors."""
    if labels.isna().any():
        pos = int(np.flatnonzero(labels.isna().to_numpy())[0])
        raise ConfigError(
            f"data.label = {labels.name!r}: {where} row {pos} has no label ({int(labels.isna().sum())} rows)"
        )
    keys = labels.map(_key)
    try:
        classes = tuple(sorted(pd.unique(keys)))
    except TypeError:  # mixed types: compare as text
        keys = keys.map(str)
        classes = tuple(sorted(pd.unique(keys)))
    if len(classes) < 2:
        raise ConfigError(
            f"data.label = {labels.name!r}: {where} has one class only ({classes[0]!r}); a classifier needs two or more"
        )
    if len(classes) > 1000:
        raise ConfigError(f"data.label = {labels.name!r}: {len(classes)} classes; is this a regression target?")
    lookup = {c: i for i, c in enumerate(classes)}
    return tuple(plain_value(c) for c in classes), keys.map(lookup).to_numpy(dtype=np.int64)


def time_values(frame: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """The time column as datetime64[ns]; an unparsable or missing value names its row."""
    values = frame[column]
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        parsed = pd.to_datetime(values, errors="coerce", utc=False, format="mixed")
    bad = parsed.isna()
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(
            f"data.time = {column!r}: {where} {_row_label(frame, pos)} holds {values.iloc[pos]!r}, "
            f"which is not a time ({int(bad.sum())} such row(s))"
        )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.to_numpy(dtype="datetime64[ns]")


@dataclass
class PreparedTable:
    """A table split and encoded: what `DistillDataModule` builds its `RawDataset` from."""

    schema: TableSchema
    x: np.ndarray
    y: np.ndarray
    frame: pd.DataFrame  # the feature columns as the user gave them (for teachers that take it)
    times: np.ndarray | None
    order: np.ndarray | None  # row positions in time order, for a time split


def prepare_table(
    frame: pd.DataFrame,
    spec: TableSpec,
    where: str,
    train_rows: Any,
) -> PreparedTable:
    """Check, fit on the training rows (`train_rows(y, order) -> indices`), encode every row."""
    frame = frame.reset_index(drop=True)
    features = check_columns(frame, spec, where)
    if spec.split == "time" and not spec.time:
        raise ConfigError("data.split = 'time' needs data.time: the column that orders the rows")
    classes, y = label_classes(frame[spec.label], where)
    times = time_values(frame, spec.time, where) if spec.time else None
    order = np.argsort(times, kind="stable") if times is not None else None
    train = train_rows(y, order)
    schema = fit_schema(frame, spec, features, train, classes, where)
    x = schema.encode(frame, where)
    return PreparedTable(schema, x, y, frame[features], times, order)
