"""Evaluation building blocks: corruptions, candidates (torch, scikit-learn, ONNX), timing keys,
peak memory, gate decisions, figures and the model card. Fast: no training beyond the shared run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_ops.config.training import DataConfig
from kd_ops.data.corruptions import CORRUPTIONS
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.evaluation.metrics import (
    COMMON_METRICS,
    EvaluationSettings,
    activation_peak_bytes,
    evaluate_candidate,
    known_metric,
    torch_candidate,
)
from kd_ops.models.zoo import build_model
from kd_ops.registry.gates import check, slice_drop

FAST = EvaluationSettings(latency_repeats=10, throughput_batches=(1, 32), throughput_repeats=2)


@pytest.fixture(scope="module")
def dm():
    d = DistillDataModule(DataConfig(name="digits"), seed=0)
    d.setup()
    return d


@pytest.mark.parametrize("kind", ["noise", "shift", "contrast"])
def test_corruptions_keep_shape_range_and_labels_and_are_deterministic(dm, kind):
    x, y = dm.arrays("test")
    xc, yc = dm.corrupted("test", kind)
    assert xc.shape == x.shape and xc.dtype == np.float32
    np.testing.assert_array_equal(yc, y)
    assert xc.min() >= 0 and xc.max() <= 16
    assert not np.allclose(xc, x)
    np.testing.assert_array_equal(xc, dm.corrupted("test", kind)[0])


def test_shift_moves_the_image_down_and_right(dm):
    x, _ = dm.arrays("test")
    img, shifted = x[0].reshape(8, 8), dm.corrupted("test", "shift")[0][0].reshape(8, 8)
    np.testing.assert_array_equal(shifted[1:, 1:], img[:-1, :-1])
    assert shifted[0].sum() == 0 and shifted[:, 0].sum() == 0
    assert sorted(CORRUPTIONS.names()) == ["contrast", "noise", "shift"]


def test_candidate_metrics_cover_quality_robustness_and_efficiency(dm):
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [16]}, dm.input_shape, dm.n_classes, *dm.normalization())
    ev = evaluate_candidate(torch_candidate(model), dm, FAST)
    assert set(COMMON_METRICS) <= set(ev.metrics)
    assert {"throughput_per_s_bs1", "throughput_per_s_bs32", "throughput_per_s_bs256"} <= set(ev.metrics)
    m = ev.metrics
    assert m["latency_ms_p50"] <= m["latency_ms_p95"] <= m["latency_ms_p99"]
    assert m["peak_memory_bytes"] > m["model_size_bytes"] / 2  # weights plus activations
    assert ev.confusion.shape == (10, 10) and ev.confusion.sum() == len(dm.splits.test)
    assert np.trace(ev.confusion) / ev.confusion.sum() == pytest.approx(m["test_accuracy"])
    # another split gets its own prefix
    val = evaluate_candidate(torch_candidate(model), dm, FAST, split="val")
    assert "val_accuracy" in val.metrics and "test_accuracy" not in val.metrics


def test_activation_peak_grows_with_the_batch(dm):
    model = build_model("cnn", {"channels": [8, 16], "hidden": 32}, dm.input_shape, 10)
    x = dm.arrays("test")[0]
    small, large = activation_peak_bytes(model, x[:8]), activation_peak_bytes(model, np.resize(x, (512, 64)))
    assert 0 < small < large
    # the first conv block alone holds 512 x 8 x 8 x 8 float32 outputs
    assert large >= 512 * 8 * 8 * 8 * 4


def test_cnn_with_batch_norm_exports_with_eval_semantics(dm, tmp_path):
    from kd_ops.evaluation.edge import edge_candidates

    torch.manual_seed(0)
    model = build_model("cnn", {"channels": [8, 16], "hidden": 32}, dm.input_shape, 10, *dm.normalization())
    model.train()  # as a freshly built model is: the export must not keep batch statistics
    x = dm.arrays("test")[0]
    ((fp32, _),) = edge_candidates(model, x, tmp_path, kinds=("onnx",))
    with torch.inference_mode():
        expected = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(fp32.predict(x[:3]), expected[:3], rtol=1e-4, atol=1e-4)


def test_onnx_and_int8_exports_agree_with_the_network(dm, tmp_path):
    from kd_ops.evaluation.edge import edge_candidates

    torch.manual_seed(0)
    # big enough that weights dominate the file: int8 must then be smaller
    model = build_model("mlp", {"hidden": [256, 128]}, dm.input_shape, 10, *dm.normalization())
    # Trained a little: an untrained network's classes are a hair apart, so int8 rounding flips
    # them by chance, and how often depends on the CPU's int8 kernels (0.89 agreement on one
    # machine, above 0.95 on another). A network with real margins is what gets exported.
    xt, yt = (torch.as_tensor(a) for a in dm.arrays("train"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    x = dm.arrays("test")[0]
    (fp32, fp32_path), (int8, int8_path) = edge_candidates(model, x, tmp_path)
    with torch.inference_mode():
        expected = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(fp32.predict(x), expected, rtol=1e-4, atol=1e-4)
    assert (int8.predict(x).argmax(1) == expected.argmax(1)).mean() > 0.95
    assert fp32_path.suffix == ".onnx" and int8_path.stat().st_size < 0.5 * fp32_path.stat().st_size
    ev = evaluate_candidate(int8, dm, FAST)
    assert set(COMMON_METRICS) <= set(ev.metrics)


def test_known_metrics():
    assert known_metric("latency_ms_p95") and known_metric("accuracy_retention")
    assert known_metric("test_accuracy_slice_label_3") and known_metric("throughput_per_s_bs32")
    assert not known_metric("latency_p95") and not known_metric("test_accuracy_slice_")


def test_gate_decisions():
    metrics = {"accuracy_retention": 0.97, "latency_ms_p95": 2.0, "model_size_bytes": 1e6}
    gates = {
        "min_accuracy_retention": 0.95,
        "max_latency_ms_p95": 1.0,
        "max_model_size_bytes": 1e6,
        "min_agreement_with_teacher": 0.9,
        "max_slice_drop_vs_champion": 0.05,
    }
    by_gate = {d.gate: d for d in check(gates, metrics, {"slice_drop_vs_champion": (0.01, "vs champion v1")})}
    assert by_gate["min_accuracy_retention"].passed and by_gate["min_accuracy_retention"].op == ">="
    assert not by_gate["max_latency_ms_p95"].passed
    assert by_gate["max_model_size_bytes"].passed  # the threshold itself passes
    missing = by_gate["min_agreement_with_teacher"]
    assert not missing.passed and missing.value is None and "not produced" in missing.note
    assert by_gate["max_slice_drop_vs_champion"].passed
    assert by_gate["max_latency_ms_p95"].tag_value() == "FAIL: 2 <= 1"
    # no champion yet: nothing to fall behind; a champion that could not be scored fails
    assert check({"max_slice_drop_vs_champion": 0.05}, {}, {"slice_drop_vs_champion": (None, "no champion yet")})[
        0
    ].passed
    assert not check({"max_slice_drop_vs_champion": 0.05}, {}, {"slice_drop_vs_champion": (None, "unscorable")})[
        0
    ].passed


def test_slice_drop_is_the_worst_slice():
    challenger = {"test_accuracy_slice_label_0": 0.9, "test_accuracy_slice_label_1": 0.5, "test_accuracy": 0.7}
    champion = {"test_accuracy_slice_label_0": 0.8, "test_accuracy_slice_label_1": 0.7, "test_accuracy": 0.75}
    value, note = slice_drop(challenger, champion)
    assert value == pytest.approx(0.2) and "label_1" in note
    assert math.isnan(slice_drop({}, champion)[0])


def test_figures_are_png(distilled, tmp_path):
    from kd_ops.evaluation.plots import all_figures, reliability_curve

    _, result = distilled
    x, y = result.datamodule.arrays("test")
    logits = {r: torch.as_tensor(result.models[r](torch.as_tensor(x))).detach().numpy() for r in ("teacher", "student")}
    paths = all_figures(result.metrics, logits, y, tmp_path)
    assert [p.name for p in paths] == [
        "accuracy_vs_latency.png",
        "accuracy_vs_size.png",
        "reliability.png",
        "slice_accuracy.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    conf, acc, count = reliability_curve(logits["teacher"], y)
    assert count.sum() == len(y) and np.all((0 <= acc) & (acc <= 1)) and np.all(np.diff(conf) > 0)
