"""The monitor on real traffic: the distilled student's own predictions on replayed scenarios, real
Evidently reports, the reference stored in MLflow, and a real prediction log for the end to end run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kd_ops.config.monitoring import MonitorConfig
from kd_ops.data.scenarios import sample
from kd_ops.evaluation.reference import Reference, ReferenceMissing, load_reference
from monitors.decision import decide, judge
from monitors.signals import confidence_estimate, drop_p_value, evidently_accuracy
from monitors.window import Window, WindowError, window_from_frame


def _window(result, scenario: str, rows: int, seed: int = 0, split: str = "test", labelled: float = 1.0) -> Window:
    dm = result.datamodule
    x, y = sample(dm, scenario, rows, seed=seed, split=split)
    with torch.inference_mode():
        probs = torch.softmax(result.models["student"](torch.as_tensor(x)), 1).numpy()
        teacher = result.models["teacher"](torch.as_tensor(x)).argmax(1).numpy().astype(float)
    labels = y.astype(float)
    labels[int(labelled * rows) :] = np.nan
    return Window(
        result.registered["name"],
        result.registered["version"],
        x,
        probs,
        labels,
        teacher,
        {"ink": dm.input_slices().compute(x)["ink"]},
    )


@pytest.fixture(scope="module")
def reference(distilled, tracking_uri):
    _, result = distilled
    return load_reference(result.registered["name"], result.registered["version"], tracking_uri)


def test_clean_traffic_is_ok(distilled, reference):
    _, result = distilled
    rows = 800
    out = judge(_window(result, "clean", rows, split="val"), reference, MonitorConfig())
    assert out.status == "ok", out.reasons
    # A resample of the reference's own rows: every drop is sampling noise, within three standard
    # errors of a share over `rows` rows (at most 3 * sqrt(0.25 / 800) = 0.053), not a shift.
    noise = 3 * (0.25 / rows) ** 0.5
    assert out.metrics["drift_share"] < 0.3 and abs(out.metrics["accuracy_drop"]) < noise
    assert abs(out.metrics["estimated_accuracy_drop"]) < noise and abs(out.metrics["agreement_drop"]) < noise
    assert set(out.snapshots) == {"drift", "quality"}
    quality = out.snapshots["quality"].dict()["metrics"]
    accuracy = next(m["value"] for m in quality if m["config"]["type"].endswith(":Accuracy"))
    assert accuracy == pytest.approx(out.metrics["accuracy"])
    assert any(
        m["config"]["type"].endswith(":F1ByLabel") for m in quality
    )  # the classification report, not accuracy alone


def test_noise_raises_an_alert_naming_the_signals(distilled, reference):
    _, result = distilled
    out = judge(_window(result, "noise", 800), reference, MonitorConfig())
    assert out.status == "alert"
    signals = {r.signal for r in out.reasons if r.status == "alert"}
    assert "drift_share" in signals and out.metrics["drift_share"] > 0.5
    # Labels arrived: the decay itself is measured (and tested against the small test reference's noise).
    assert out.metrics["accuracy_drop"] > 0.06 and out.metrics["accuracy_drop_p_value"] < 0.05
    reason = next(r for r in out.reasons if r.signal == "drift_share")
    assert reason.threshold == 0.5 and "drift_share" in reason.message


def test_one_slice_decays_while_the_others_hold(distilled, reference):
    _, result = distilled
    out = judge(_window(result, "slice_noise", 1200), reference, MonitorConfig())
    low, high = out.metrics["accuracy_drop_slice_ink_low"], out.metrics["accuracy_drop_slice_ink_high"]
    assert low > high + 0.1  # each slice is scored on its own rows (Evidently's GroupBy would not tell)
    assert out.metrics["slice_accuracy_drop"] == pytest.approx(low)
    assert out.metrics["slice_accuracy_drop"] > out.metrics["accuracy_drop"]  # the average hides it
    assert out.metrics["slice_drift"] > 0.25  # noisy thin strokes leave the low-ink slice: its share drifts


def test_label_free_estimate_follows_accuracy_without_labels(distilled, reference):
    _, result = distilled
    clean = judge(_window(result, "clean", 800, split="val", labelled=0.0), reference, MonitorConfig())
    noisy = judge(_window(result, "noise", 800, labelled=0.0), reference, MonitorConfig())
    assert "accuracy" not in clean.metrics and any("labelled rows" in s for s in clean.skipped)
    assert noisy.metrics["estimated_accuracy"] < clean.metrics["estimated_accuracy"]
    assert confidence_estimate(reference, reference.confidence) == pytest.approx(reference.accuracy, abs=1e-6)


def test_a_drop_on_few_rows_must_be_significant_to_count():
    cfg = MonitorConfig()
    reference = np.array([True] * 260 + [False] * 10)  # 96.3% on 270 rows
    noise = drop_p_value(np.array([True] * 91 + [False] * 9), reference)  # 91% on 100 rows
    real = drop_p_value(np.array([True] * 80 + [False] * 20), reference)  # 80%
    assert real < cfg.rate_p_value < noise < 0.05
    assert drop_p_value(reference, reference) > 0.5

    status, reasons, notes = decide({"accuracy_drop": 0.053, "accuracy_drop_p_value": noise}, cfg)
    assert status == "ok" and reasons == [] and "not significant" in notes[0] and "accuracy_drop" in notes[0]
    status, reasons, _ = decide({"accuracy_drop": 0.163, "accuracy_drop_p_value": real}, cfg)
    assert status == "alert" and reasons[0].signal == "accuracy_drop"
    status, reasons, _ = decide({"drift_share": 0.6}, cfg)  # a signal without a p-value: the threshold alone
    assert status == "alert"


def test_confidence_estimate_counts_ties_at_the_threshold():
    # A saturated student: most confidences are exactly 1.0, so the threshold sits on a tie.
    probs = np.full((10, 2), [1.0, 0.0], dtype=np.float32)
    probs[8:] = [0.6, 0.4]
    labels = np.array([0] * 7 + [1] * 3)  # accuracy 0.7: the 8 saturated rows hold 7 right, 1 wrong
    ref = Reference(np.zeros((10, 1), np.float32), labels, probs)
    assert confidence_estimate(ref, ref.confidence) == pytest.approx(0.7)
    assert confidence_estimate(ref, np.full(4, 0.6)) == 0.0  # every row below the threshold
    assert confidence_estimate(ref, np.ones(4)) == pytest.approx(7 / 8)


def test_a_small_window_says_so(distilled, reference):
    _, result = distilled
    out = judge(_window(result, "noise", 50), reference, MonitorConfig())
    assert out.status == "insufficient" and out.reasons == [] and "50 rows < min_rows 200" in out.skipped[0]


def _frame(rows: int = 3, width: int = 64) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(rows)],
            "created_at": pd.Timestamp("2026-01-01"),
            "model_version": "1",
            "inputs": [[0.0] * width for _ in range(rows)],
            "probabilities": [[0.1] * 10 for _ in range(rows)],
            "predicted_class": 0,
            "confidence": 0.1,
        }
    )


def test_bad_windows_are_named():
    assert window_from_frame(_frame(), "m", 64, 10).rows == 3
    with pytest.raises(WindowError, match="lacks column\\(s\\) probabilities"):
        window_from_frame(_frame().drop(columns="probabilities"), "m", 64, 10)
    extra = _frame()
    extra.at[1, "inputs"] = [0.0] * 65
    with pytest.raises(WindowError, match="row 1 has 65 values where the reference has 64 \\(extra columns\\)"):
        window_from_frame(extra, "m", 64, 10)
    with pytest.raises(WindowError, match="missing columns"):
        window_from_frame(_frame(width=60), "m", 64, 10)
    wrong = _frame()
    wrong["inputs"] = "not a list"
    with pytest.raises(WindowError, match="column 'inputs': row 0 holds str"):
        window_from_frame(wrong, "m", 64, 10)
    labels = _frame()
    labels["label"] = ["3", "x", "1"]
    with pytest.raises(WindowError, match="column 'label'"):
        window_from_frame(labels, "m", 64, 10)
    nan = _frame()
    nan.at[2, "probabilities"] = [float("nan")] + [0.1] * 9
    with pytest.raises(WindowError, match="column 'probabilities': row id='p2' holds NaN or infinite values"):
        window_from_frame(nan, "m", 64, 10)
    assert window_from_frame(_frame(0), "m", 64, 10).rows == 0


def test_a_version_without_reference_is_refused(tracking_uri):
    with pytest.raises(ReferenceMissing):
        load_reference("test-student", "999", tracking_uri)


def test_evidently_accuracy_is_computed_on_the_rows_given():
    pred = np.array([0, 1, 2, 2, 1, 0])
    labels = np.array([0, 1, 1, 2, 0, 0])
    assert evidently_accuracy(pred, labels) == pytest.approx(4 / 6)
    assert evidently_accuracy(pred[:2], labels[:2]) == 1.0  # a slice: its own rows only
    assert evidently_accuracy(np.array([2, 2]), np.array([2, 1])) == 0.5  # classes missing from the slice


def test_the_warn_band_of_the_estimated_accuracy_drop_needs_significance_too(distilled, reference):
    """Clean traffic lands an estimate a point or three under the reference by chance (the demo's first
    window warned at 0.030 > 0.03): both bands now ask the same Fisher test as accuracy does."""
    from monitors.signals import estimate_drop_p_value

    cfg = MonitorConfig()
    warn = cfg.thresholds.estimated_accuracy_drop.warn
    chance = reference.accuracy - (warn + 0.005)
    metrics = {"estimated_accuracy_drop": warn + 0.005}
    metrics["estimated_accuracy_drop_p_value"] = estimate_drop_p_value(chance, 1000, reference)
    status, reasons, notes = decide(metrics, cfg)
    assert metrics["estimated_accuracy_drop_p_value"] > cfg.rate_p_value
    assert status == "ok" and not reasons
    assert any("estimated_accuracy_drop" in n and "not significant" in n for n in notes)
    # A real collapse is significant and alerts.
    collapse = max(0.0, reference.accuracy - 0.3)
    metrics = {"estimated_accuracy_drop": reference.accuracy - collapse}
    metrics["estimated_accuracy_drop_p_value"] = estimate_drop_p_value(collapse, 1000, reference)
    status, reasons, _ = decide(metrics, cfg)
    assert status == "alert" and reasons[0].signal == "estimated_accuracy_drop"
    # judge() computes the p-value beside the estimate.
    _, result = distilled
    out = judge(_window(result, "clean", 800, split="val"), reference, cfg)
    assert 0 <= out.metrics["estimated_accuracy_drop_p_value"] <= 1


def test_feedback_accuracy_is_compared_with_the_reference_rows_whose_labels_are_true(distilled, reference):
    """A re-distilled version's reference is recent traffic labelled by the teacher where no
    feedback arrived; agreement with the teacher would pass for accuracy there. Only the rows
    with a true label (`known`) are what a window's feedback accuracy is compared with."""
    import dataclasses

    _, result = distilled
    n = len(reference.labels)
    # Teacher-like labels on the unknown rows: the student "agrees" on all of them.
    known = np.zeros(n, dtype=bool)
    known[: n // 2] = True
    agreeing = np.where(known, reference.labels, reference.predicted)
    mixed = dataclasses.replace(reference, labels=agreeing, known=known)
    assert mixed.accuracy > mixed.true_accuracy  # the inflated figure the monitor must not use
    window = _window(result, "clean", 600, split="val")
    out = judge(window, mixed, MonitorConfig())
    truly = float((reference.predicted[known] == reference.labels[known]).mean())
    assert out.metrics["accuracy_drop"] == pytest.approx(truly - out.metrics["accuracy"])
    # Too few true-labelled rows: accuracy is not judged, and the result says why.
    few = dataclasses.replace(mixed, known=np.arange(n) < 10)
    out = judge(window, few, MonitorConfig())
    assert "accuracy_drop" not in out.metrics
    assert any("rows with a true label" in s for s in out.skipped)


def test_a_reference_keeps_which_labels_are_true(tmp_path, reference):
    import dataclasses

    known = np.arange(len(reference.labels)) % 3 == 0
    dataclasses.replace(reference, known=known).save(tmp_path / "ref.npz")
    back = Reference.load(tmp_path / "ref.npz")
    assert np.array_equal(back.known, known) and back.true_rows.sum() == known.sum()
    reference.save(tmp_path / "plain.npz")
    assert Reference.load(tmp_path / "plain.npz").known is None
