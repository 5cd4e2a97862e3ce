"""The distillation wrapper: the teacher is frozen, the export is the plain student."""

from __future__ import annotations

import lightning as L
import torch

from kd_ops.config.training import DataConfig, DistillConfig
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.distill.losses import build_losses
from kd_ops.distill.module import DistillationModule
from kd_ops.models.zoo import build_model


def _pair(dm: DistillDataModule):
    mean, std = dm.normalization()
    teacher = build_model("cnn", {"channels": [4, 8], "hidden": 16}, dm.input_shape, dm.n_classes, mean, std)
    student = build_model("mlp", {"hidden": [8]}, dm.input_shape, dm.n_classes, mean, std)
    return teacher, student


def test_teacher_weights_and_mode_unchanged_by_distillation():
    dm = DistillDataModule(DataConfig(name="digits", batch_size=64), seed=0, role="transfer")
    teacher, student = _pair(dm)
    teacher.train()  # even a teacher handed over in train mode must be used in eval mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN running stats included
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    module = DistillationModule(student, teacher, build_losses(DistillConfig(method="kd")), ce_weight=0.1, jitter=0.3)
    L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(module, datamodule=dm)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items()), "student never learned"


def test_export_is_the_plain_student():
    dm = DistillDataModule(DataConfig(name="digits"), seed=0)
    teacher, student = _pair(dm)
    module = DistillationModule(student, teacher, build_losses(DistillConfig(method="kd")))
    exported = module.export()
    assert type(exported) is type(student)
    assert set(exported.state_dict()) == set(student.state_dict())
    assert not any(isinstance(m, DistillationModule) for m in exported.modules())
    assert not exported.training
    x = torch.as_tensor(dm.arrays("test")[0][:8])
    torch.testing.assert_close(exported(x), student.eval()(x))


def test_kd_terms_need_a_teacher():
    dm = DistillDataModule(DataConfig(name="digits"), seed=0)
    _, student = _pair(dm)
    try:
        DistillationModule(student, None, build_losses(DistillConfig(method="kd")))
    except ValueError as exc:
        assert "KD" in str(exc)
    else:
        raise AssertionError("a KD loss without a teacher must be refused")


def test_mixup_blends_inputs_and_labels_alike():
    dm = DistillDataModule(DataConfig(name="digits"), seed=0)
    teacher, student = _pair(dm)
    module = DistillationModule(student, teacher, build_losses(DistillConfig(method="kd")), mixup=0.4)
    x = torch.as_tensor(dm.arrays("test")[0][:32])
    y = torch.as_tensor(dm.arrays("test")[1][:32])
    torch.manual_seed(0)
    xm, ym = module._augment(x, y)
    assert ym.shape == (32, 10)
    torch.testing.assert_close(ym.sum(1), torch.ones(32))
    # each blended row is lam * x_i + (1 - lam) * x_j with the same lam as its label
    lam = ym[torch.arange(32), y]
    assert ((lam >= 0) & (lam <= 1 + 1e-6)).all()
    assert not torch.equal(xm, x)
    # a soft target works with the same forward_train (cross-entropy on probabilities)
    _, losses = module.forward_train(xm, ym)
    assert set(losses) == {"ce", "kd"} and all(torch.isfinite(v) for v in losses.values())


def test_no_augmentation_by_default():
    dm = DistillDataModule(DataConfig(name="digits"), seed=0)
    _, student = _pair(dm)
    module = DistillationModule(student)
    x = torch.as_tensor(dm.arrays("test")[0][:4])
    y = torch.as_tensor(dm.arrays("test")[1][:4])
    xa, ya = module._augment(x, y)
    assert xa is x and ya is y
