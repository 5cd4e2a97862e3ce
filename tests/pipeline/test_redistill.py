"""The pieces of re-distillation that need no registry: production rows joining the transfer set
only, the robust teacher's corruptions, the recipe it runs, and the config it is set by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ops.config.loading import config_from_dict
from kd_ops.config.training import DataConfig
from kd_ops.core.errors import ConfigError
from kd_ops.data.corruptions import corrupt_some
from kd_ops.data.datamodule import DistillDataModule, ExtraRows, make_splits, with_extra_rows
from kd_ops.data.datasets import load_digits
from kd_ops.pipeline.redistill import redistill_config


def test_extra_rows_join_the_transfer_set_only():
    base = DistillDataModule(DataConfig(name="digits"), seed=0)
    base.setup()
    x = np.full((7, 64), 3.0, dtype=np.float32)
    dm = DistillDataModule(DataConfig(name="digits"), seed=0, extra=ExtraRows(x, np.arange(7) % 10))
    dm.setup()
    for split in ("train", "val", "test"):  # the rows every model is scored on do not move
        assert np.array_equal(getattr(dm.splits, split), getattr(base.splits, split))
    added = dm.splits.transfer[-7:]
    assert len(dm.splits.transfer) == len(base.splits.transfer) + 7
    assert np.array_equal(dm.raw.x[added], x) and list(dm.raw.y[added]) == list(range(7))
    assert dm.fingerprint() != base.fingerprint()  # the teacher-output cache cannot mix them up
    assert dm.with_role("transfer").splits is dm.splits


def test_extra_rows_that_do_not_fit_are_refused():
    ds = load_digits()
    splits = make_splits(ds, DataConfig(name="digits"), 0)
    with pytest.raises(ValueError, match="64 features"):
        with_extra_rows(ds, splits, ExtraRows(np.zeros((2, 63), np.float32), np.zeros(2, int)))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        with_extra_rows(ds, splits, ExtraRows(np.zeros((2, 64), np.float32), np.array([0, 10])))


def test_corrupt_some_changes_about_its_share_of_rows():
    ds = load_digits()
    x = torch.as_tensor(ds.x[:400])
    out = corrupt_some(["shift", "noise"], 0.5, ds, seed=0)(x)
    changed = (out != x).any(dim=1).float().mean().item()
    assert 0.35 < changed < 0.65 and out.dtype == x.dtype and out.shape == x.shape
    assert float(out.min()) >= 0 and float(out.max()) <= ds.max_value  # corrupted rows stay in range


def test_an_unknown_corruption_names_its_key():
    with pytest.raises(ConfigError, match=r"teacher.augment.1 = 'blur'"):
        config_from_dict({"teacher": {"augment": ["noise", "blur"]}}, "t.yaml")


def test_the_redistill_recipe_loads_the_lineage_teacher_and_decides_promotion_itself():
    cfg = config_from_dict({"teachers": [{"model": "mlp"}], "distill": {"teacher_weights": [0.5, 0.5]}}, "t")
    out = redistill_config(cfg, "models:/m-teacher,models:/m-second")
    assert out.teacher.uri == "models:/m-teacher" and out.teachers[0].uri == "models:/m-second"
    assert out.distill.baseline is False and out.registry.promote is False
    assert cfg.registry.promote is True  # the user's config is untouched


def test_redistill_settings_are_checked():
    with pytest.raises(ConfigError, match=r"redistill.holdout_fraction"):
        config_from_dict({"redistill": {"holdout_fraction": 1.5}}, "t")
    with pytest.raises(ConfigError, match=r"monitor.cron = 'often'"):
        config_from_dict({"monitor": {"cron": "often"}}, "t")


def test_fsdp_on_cpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"train.strategy = 'fsdp' needs a GPU"):
        config_from_dict({"train": {"strategy": "fsdp", "devices": 2}}, "t")
    assert config_from_dict({"train": {"strategy": "ddp_spawn", "devices": 2}}, "t").train.num_nodes == 1
