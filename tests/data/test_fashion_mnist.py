"""Fashion-MNIST from Debian's dataset-fashion-mnist package: the full 60k/10k split, and a clear
error naming how to install it where the files are missing (`make test` installs them)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import yaml

from kd_ops.cli.main import main
from kd_ops.config.loading import config_from_dict
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.data.datasets import DatasetUnavailable, load_fashion_mnist, read_idx

from ..conftest import tiny_raw


def test_the_dataset_keeps_its_own_test_split_for_every_seed():
    ds = load_fashion_mnist()
    assert ds.x.shape == (70_000, 784) and ds.input_shape == (1, 28, 28) and ds.max_value == 255.0
    assert np.bincount(ds.y).tolist() == [7000] * 10 and len(ds.class_names) == 10
    cfg = config_from_dict({"data": {"name": "fashion-mnist"}}).data
    dms = [DistillDataModule(cfg, seed) for seed in (0, 1)]
    for dm in dms:
        dm.setup()
    a, b = (dm.splits for dm in dms)
    assert np.array_equal(a.test, np.arange(60_000, 70_000)) and np.array_equal(a.test, b.test)
    assert len(a.train) + len(a.val) == 60_000 and not np.array_equal(a.val, b.val)
    assert not set(a.val) & set(a.test) and not set(a.train) & set(a.val)


def test_missing_files_are_a_config_error_saying_how_to_install(tmp_path, monkeypatch, capsys, tracking_uri):
    monkeypatch.setenv("KD_OPS_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist.__wrapped__()
    load_fashion_mnist.cache_clear()
    try:
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump(tiny_raw(tracking_uri, data={"name": "fashion-mnist"})))
        assert main(["distill", str(path)]) == 2
        err = capsys.readouterr().err
        assert "dataset-fashion-mnist" in err and "Traceback" not in err
    finally:
        monkeypatch.delenv("KD_OPS_FASHION_MNIST_DIR")
        load_fashion_mnist.cache_clear()


def test_a_damaged_idx_file_is_named(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 10)
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(bad)


@pytest.mark.slow
def test_distil_on_fashion_mnist_scores_on_its_test_images(tmp_path, capsys, tracking_uri):
    raw = tiny_raw(
        tracking_uri,
        data={"name": "fashion-mnist", "train_fraction": 0.02, "labelled_fraction": 0.5, "batch_size": 128},
        teacher={"model": "mlp", "params": {"hidden": [64]}, "epochs": 1},  # the teacher reads all 51k rows
        student={"epochs": 2},
        registry={"name": "fashion-student"},
        evaluation={"robustness": False, "latency_repeats": 5, "throughput_repeats": 1},
    )
    raw["distill"].update(cache={"dir": str(tmp_path / "cache")})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["teacher"]["test_accuracy"] > 0.6  # ten classes: chance is 0.1
    assert out["student"]["test_accuracy"] > 0.5
