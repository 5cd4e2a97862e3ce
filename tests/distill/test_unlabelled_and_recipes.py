"""Unlabelled transfer rows (`data.labelled_fraction`), the function-matching recipe, CutMix and
swap noise, method defaults that keep KD beside feature terms, and the data-free student."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient

from kd_ops.cli.main import main
from kd_ops.config.loading import config_from_dict, load_config
from kd_ops.data.datamodule import UNLABELLED, DistillDataModule
from kd_ops.distill.losses import build_losses
from kd_ops.distill.module import DistillationModule, cutmix, supervised_loss
from kd_ops.registry.tracking import TAG_TEACHER_URI

from ..conftest import ROOT, tiny_raw


def _dm(**data) -> DistillDataModule:
    cfg = config_from_dict({"data": {"name": "digits", **data}})
    dm = DistillDataModule(cfg.data, 0)
    dm.setup()
    return dm


def test_labelled_fraction_keeps_a_stratified_share_and_hides_the_rest_from_training():
    dm = _dm(labelled_fraction=0.1)
    s = dm.splits
    assert set(s.labelled) < set(s.transfer)
    assert len(s.labelled) == round(0.1 * len(s.transfer))
    assert len(np.unique(dm.raw.y[s.labelled])) == 10  # every class keeps some labels
    # The student's loader: all transfer rows, the unlabelled ones with label -1.
    x, y, index = (torch.cat(parts) for parts in zip(*dm.with_role("transfer").train_dataloader()))
    assert len(index) == len(s.transfer)
    hidden = ~np.isin(index.numpy(), s.labelled)
    assert (y.numpy()[hidden] == UNLABELLED).all()
    assert (y.numpy()[~hidden] == dm.raw.y[index.numpy()[~hidden]]).all()
    # The baseline's loader: the labelled rows only.
    _, y_lab, index_lab = (torch.cat(parts) for parts in zip(*dm.with_role("labelled").train_dataloader()))
    assert sorted(index_lab.tolist()) == sorted(s.labelled.tolist()) and (y_lab >= 0).all()
    # Same seed, same labelled rows; another fraction changes the fingerprint (lineage, caches).
    assert np.array_equal(_dm(labelled_fraction=0.1).splits.labelled, s.labelled)
    assert _dm().splits.labelled is None and _dm().fingerprint() != dm.fingerprint()


def test_supervised_loss_reads_only_the_labels_that_exist():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    y = torch.tensor([0, -1, 2, -1, 3, 1])
    known = y >= 0
    assert torch.allclose(supervised_loss(logits, y), F.cross_entropy(logits[known], y[known]))
    assert supervised_loss(logits, torch.full((6,), -1)).item() == 0.0
    # Soft targets: an unlabelled row has no label mass; a half-labelled blend has half.
    soft = torch.zeros(6, 4)
    soft[0, 0], soft[2, 2], soft[4, 1] = 1.0, 0.5, 1.0
    expected = -(soft * F.log_softmax(logits, 1)).sum() / 2.5
    assert torch.allclose(supervised_loss(logits, soft), expected)


def test_mixup_of_unlabelled_rows_adds_no_label_mass_and_terms_get_the_teachers_class():
    student = torch.nn.Sequential(torch.nn.Linear(4, 3))
    module = DistillationModule(student, mixup=1.0)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, -1, -1, -1, -1])
    _, mixed = module._augment(x, y)
    assert mixed.shape == (8, 3) and float(mixed.sum(1).max()) <= 1 + 1e-6 and float(mixed.sum()) < 8
    teacher_logits = torch.tensor([[0.0, 0.0, 9.0]] * 8)
    filled = DistillationModule._filled(y, teacher_logits)
    assert filled.tolist() == [0, 1, 2, 0, 2, 2, 2, 2]
    soft = DistillationModule._filled(mixed, teacher_logits)
    assert torch.allclose(soft.sum(1), torch.ones(8), atol=1e-5)


def test_cutmix_pastes_a_box_and_mixes_targets_by_its_area():
    x = torch.zeros(2, 16)
    x[1] = 1.0
    y = torch.eye(2)
    out, target = cutmix(x, y, torch.tensor(0.75), torch.tensor([1, 0]), (1, 4, 4))
    area = float(out[0].mean())  # the share of row 0 that came from row 1
    assert 0 < area < 1 and out[0].reshape(4, 4).sum() == out[0].sum()
    assert torch.allclose(target[0], torch.tensor([1 - area, area]))
    with pytest.raises(ValueError, match="cutmix needs image rows"):
        DistillationModule(torch.nn.Linear(4, 2), cutmix=1.0, input_shape=(4,))


def test_function_matching_fills_only_the_keys_a_config_leaves_unset():
    cfg = config_from_dict({"distill": {"recipe": "function_matching", "temperature": 3.0}})
    assert cfg.distill.temperature == 3.0  # the user's key wins
    assert cfg.distill.mixup > 0 and cfg.distill.cutmix > 0 and cfg.distill.kd_weight == 1.0
    assert cfg.student.min_steps >= 5000  # patience: a long schedule by step count
    table = config_from_dict({"data": {"name": "churn"}, "distill": {"recipe": "function_matching"}})
    assert table.distill.mixup == 0 and table.distill.cutmix == 0 and table.distill.swap_noise > 0
    with pytest.raises(Exception, match="distill.recipe = 'patient'"):
        config_from_dict({"distill": {"recipe": "patient"}})


def test_feature_methods_train_beside_plain_kd_at_their_own_weight():
    cfg = config_from_dict({"distill": {"method": "crd", "kd_weight": 0.9}}).distill
    terms = build_losses(cfg)
    assert [(t.loss_name, t.weight) for t in terms] == [("kd", 0.9), ("crd", 0.8)]
    weighted = cfg.model_copy(update={"method_weight": 0.3})
    assert [(t.loss_name, t.weight) for t in build_losses(weighted)] == [("kd", 0.9), ("crd", 0.3)]
    # DKD replaces KD; a KD the user weighs in distill.losses is not doubled.
    assert [t.loss_name for t in build_losses(cfg.model_copy(update={"method": "dkd"}))] == ["dkd"]
    own_kd = config_from_dict({"distill": {"method": "rkd", "losses": [{"name": "kd", "weight": 0.5}]}}).distill
    assert [(t.loss_name, t.weight) for t in build_losses(own_kd)] == [("rkd", 1.0), ("kd", 0.5)]


def _run(tmp_path, capsys, raw: dict) -> dict:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["distill", str(path), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return json.loads(out.out)


@pytest.mark.slow
def test_unlabelled_rows_reach_the_student_not_the_baseline_and_fidelity_is_logged(tmp_path, capsys, tracking_uri):
    raw = tiny_raw(tracking_uri, data={"labelled_fraction": 0.1}, registry={"name": "unlabelled-student"})
    raw["distill"].update(cache={"dir": str(tmp_path / "cache")}, mixup=0.4)
    raw["student"]["min_steps"] = 100
    out = _run(tmp_path, capsys, raw)
    client = MlflowClient(tracking_uri)
    baseline, student = (client.get_run(out["runs"][r]) for r in ("baseline", "student"))
    inputs = {
        r: {d.dataset.name for d in client.get_run(out["runs"][r]).inputs.dataset_inputs}
        for r in ("baseline", "student")
    }
    assert any(n.endswith("/labelled") for n in inputs["baseline"])
    assert any(n.endswith("/transfer") for n in inputs["student"])
    # Fewer rows, more epochs for the same step budget: the baseline trained on the labelled tenth.
    assert int(baseline.data.params["effective_epochs"]) > int(student.data.params["effective_epochs"])
    history = client.get_metric_history(student.info.run_id, "val_agreement_with_teacher")
    assert len(history) >= 2 and all(0 <= m.value <= 1 for m in history)
    assert client.get_metric_history(student.info.run_id, "val_kl_to_teacher")


@pytest.mark.slow
def test_data_free_student_never_reads_training_rows_and_logs_sample_grids(tmp_path, capsys, tracking_uri):
    raw = tiny_raw(tracking_uri, registry={"name": "data-free-student"})
    raw["distill"].update(
        method="data_free", baseline=False, params={"steps": 60, "epochs": 2, "grid_every": 1, "batch_size": 32}
    )
    # Which training loaders were asked for: a data-free student must ask for none.
    read: list[str] = []
    original = DistillDataModule.train_dataloader

    def spy(self):
        read.append(self.role)
        return original(self)

    DistillDataModule.train_dataloader = spy
    try:
        out = _run(tmp_path, capsys, raw)
    finally:
        DistillDataModule.train_dataloader = original
    assert read == ["train"]  # the teacher's training only; the student's batches were synthetic
    client = MlflowClient(tracking_uri)
    run = client.get_run(out["runs"]["student"])
    assert run.data.params["data_free.bn_prior"] == "True"  # the trained CNN teacher has batch norms
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "data_free")]
    assert grids == ["data_free/samples-epoch-001.png", "data_free/samples-epoch-002.png"]
    assert 0 < out["student"]["test_accuracy"] <= 1


@pytest.mark.parametrize(
    "data, distill, expected",
    [
        ({}, {"mixup": 0.5}, "distill.mixup = 0.5: data_free reads no real input"),
        ({"name": "churn"}, {}, "'data_free' synthesises images"),
    ],
)
def test_data_free_refuses_tables_and_augmentation(tmp_path, capsys, tracking_uri, data, distill, expected):
    raw = tiny_raw(tracking_uri, data=data)
    raw["distill"].update(method="data_free", **distill)
    if data:
        raw.pop("teacher")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_shipped_examples_load_with_their_recipes():
    for name in ("digits", "mnist5k", "fashion-mnist"):
        cfg = load_config(ROOT / "examples" / f"{name}.yaml")
        assert cfg.distill.recipe in ("standard", "function_matching")


# Every method a user can name with nothing else set, from examples/digits.yaml on a small budget:
# a tenth of the transfer set labelled, where a teacher has the most to give. `hint` and
# `attention` need layer paths (distill.params) and say so: they are not in this list.
EVERY_METHOD = ["kd", "dkd", "rkd", "pkt", "crd", "born_again", "sklearn", "data_free"]
SMALL_BUDGET = [
    "data.labelled_fraction=0.1",
    "teacher.epochs=8",
    "student.epochs=5",
    "student.min_steps=400",
    "evaluation.edge=[]",
    "evaluation.latency_repeats=5",
    "evaluation.throughput_repeats=1",
    "evaluation.robustness=false",
    "gates={}",
    "train.progress_bar=false",
]


@pytest.fixture(scope="module")
def digits_example(tmp_path_factory, tracking_uri):
    """The labels-only baseline and the KD student of the small budget, and the teacher's URI."""
    root = tmp_path_factory.mktemp("every-method")
    sets = [*SMALL_BUDGET, f"tracking.uri={tracking_uri}", f"distill.cache.dir={root / 'cache'}"]
    from kd_ops.pipeline.distillation import run_distillation

    result = run_distillation(load_config(ROOT / "examples" / "digits.yaml", sets))
    teacher = MlflowClient(tracking_uri).get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]
    return sets, result.metrics, teacher


@pytest.mark.slow
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_beats_labels_only_from_the_shipped_example(method, digits_example):
    from kd_ops.pipeline.distillation import run_distillation

    sets, metrics, teacher = digits_example
    baseline = metrics["baseline"]["test_accuracy"]
    if method == "kd":
        student = metrics["student"]["test_accuracy"]
    else:
        extra = [f"distill.method={method}", "distill.baseline=false", f"teacher.uri={teacher}"]
        if method == "data_free":
            extra += ["distill.mixup=0", "distill.params={steps: 600, epochs: 3}"]
        if method == "sklearn":
            extra += ["distill.mixup=0", "distill.params={model: logistic_regression}"]
        if method == "born_again":
            extra += ["distill.params={generations: 2}"]
        student = run_distillation(load_config(ROOT / "examples" / "digits.yaml", [*sets, *extra])).metrics["student"][
            "test_accuracy"
        ]
    # Data-free reads no training row at all; the others learn the nine tenths without labels too.
    margin = 0.0 if method == "data_free" else 0.02
    assert student > baseline + margin, f"{method}: {student:.3f} vs labels only {baseline:.3f}"
