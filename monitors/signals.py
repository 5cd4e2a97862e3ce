"""The monitor's signals: drift (Evidently), accuracy on labelled rows, label-free estimates, p-values."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from kd_ops.config.monitoring import MonitorConfig
from kd_ops.evaluation.reference import Reference
from monitors.window import Window

PSI_THRESHOLD = 0.1  # Evidently's own drift flag for PSI (the decision uses monitor.thresholds)


# -- label-free estimates -----------------------------------------------------------------------
def confidence_estimate(reference: Reference, confidence: np.ndarray) -> float:
    """Accuracy of a window estimated from its confidences: Average Thresholded Confidence (Garg et
    al., ICLR 2022). On the reference, pick the confidence threshold above which the share of rows
    equals the reference accuracy; the window's estimate is its share of rows above it. Chosen
    over calibrating P(correct) on the reference (isotonic or temperature scaling, like NannyML's
    CBPE): a reference of a few hundred rows holds few errors to calibrate on, while a threshold
    needs only the accuracy, and it tracked the true accuracy best under every drift scenario
    (bench/monitor_quality.py)."""
    return float(confidence_hits(reference, confidence).mean())


def confidence_hits(reference: Reference, confidence: np.ndarray) -> np.ndarray:
    """Each row's share in the ATC estimate: 1 above the reference's threshold, 0 below, and the
    tie fraction at it; their mean is `confidence_estimate`. Per row, so Evidently's `MeanValue`
    over them gives the dashboard exactly the monitor's estimate (`monitors.dashboard`)."""
    ref = np.sort(np.asarray(reference.confidence, dtype=np.float64))
    conf = np.asarray(confidence, dtype=np.float64)
    t = float(np.quantile(ref, 1.0 - reference.accuracy, method="lower"))
    # Saturated students give many equal confidences: rows exactly at the threshold count by the
    # fraction that makes the reference's own estimate equal its accuracy.
    above, at = float((ref > t).mean()), float((ref == t).mean())
    tie = min(max((reference.accuracy - above) / at, 0.0), 1.0) if at else 0.0
    return np.where(conf > t, 1.0, np.where(conf == t, tie, 0.0))


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean())


def drop_p_value(window_hits: np.ndarray, reference_hits: np.ndarray) -> float:
    """One-sided Fisher exact test that the window's rate (accuracy, agreement) is below the
    reference's. Both are samples, a hundred or a few hundred rows: a drop of a few points is often
    their noise, so a threshold alone cries wolf (bench/monitor_quality.py)."""
    from scipy.stats import fisher_exact

    w, r = int(np.sum(window_hits)), int(np.sum(reference_hits))
    table = [[w, len(window_hits) - w], [r, len(reference_hits) - r]]
    return float(fisher_exact(table, alternative="less").pvalue)


def estimate_drop_p_value(estimate: float, rows: int, reference: Reference) -> float:
    """The same one-sided Fisher test for the label-free estimate: ATC's estimate is the window's
    share of rows above the reference's confidence threshold, and above it the reference holds a
    share equal to its accuracy, so both sides are counts of rows above one threshold. A 1000-row
    window on clean traffic lands a point or two under the reference by chance."""
    n_ref = len(reference.confidence)
    window_hits = round(estimate * rows)
    reference_hits = round(reference.accuracy * n_ref)
    return drop_p_value(
        np.arange(rows) < window_hits,
        np.arange(n_ref) < reference_hits,
    )


def _classification(pred: np.ndarray, labels: np.ndarray) -> Any:
    from evidently import DataDefinition, Dataset, MulticlassClassification

    # Integer classes and no label map: Evidently 0.7.23 raises KeyError on a slice that lacks some
    # class when given string labels or a `labels` map.
    df = pd.DataFrame({"target": np.asarray(labels).astype(int), "prediction": np.asarray(pred).astype(int)})
    definition = DataDefinition(
        classification=[MulticlassClassification(target="target", prediction_labels="prediction")]
    )
    return Dataset.from_pandas(df, data_definition=definition)


def evidently_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy by Evidently's `Accuracy` metric, on exactly these rows (so a slice is its own report:
    `GroupBy` would return the overall value for every group)."""
    from evidently import Report
    from evidently.metrics import Accuracy

    with warnings.catch_warnings():  # a one-class slice makes scikit-learn warn about the matrix shape
        warnings.simplefilter("ignore")
        snapshot = Report([Accuracy()]).run(_classification(pred, labels), None)
    return float(snapshot.dict()["metrics"][0]["value"])


def quality_report(pred: np.ndarray, labels: np.ndarray, reference: Reference) -> tuple[Any, float]:
    """Evidently's ClassificationPreset on the labelled rows beside the reference (accuracy, F1,
    precision and recall by class, confusion matrix): the report a reader opens when accuracy
    alerts. Returns the snapshot and its accuracy."""
    from evidently import Report
    from evidently.presets import ClassificationPreset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        true = reference.true_rows  # the rows whose label is a true one, as the window's
        snapshot = Report([ClassificationPreset()]).run(
            _classification(pred, labels), _classification(reference.predicted[true], reference.labels[true])
        )
    accuracy = next(m["value"] for m in snapshot.dict()["metrics"] if m["config"]["type"].endswith(":Accuracy"))
    return snapshot, float(accuracy)


# -- Evidently ------------------------------------------------------------------------------------
def _frame(x: np.ndarray, probs: np.ndarray, slices: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    df["predicted"] = probs.argmax(axis=1).astype(str)
    df["confidence"] = probs.max(axis=1)
    for name, values in (slices or {}).items():
        df[f"slice_{name}"] = np.asarray(values, dtype=str)
    return df


def drift_report(
    window: Window, reference: Reference, p_value: float
) -> tuple[Any, dict[str, float], dict[str, dict[str, Any]]]:
    """One Evidently report: per-feature drift and its share, predicted-class and confidence drift,
    and the share of traffic per slice. Returns the snapshot, the metrics, and for a table each
    input column's test, score, threshold and verdict (empty for array inputs)."""
    if window.schema is not None:
        return _table_drift(window, reference, p_value)
    return (*_array_drift(window, reference, p_value), {})


def _array_drift(window: Window, reference: Reference, p_value: float) -> tuple[Any, dict[str, float]]:
    """Pixels (or any float rows): every feature by K-S at `p_value`."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    features = [f"f{i}" for i in range(window.x.shape[1])]
    # Slices the server computed from the rows (ink): a slice that grows or shrinks is drift too,
    # the one a corruption of one slice only shows first (its rows leave the slice).
    shared = sorted(set(window.slices) & set(reference.slices))
    slice_cols = [f"slice_{n}" for n in shared]
    definition = DataDefinition(
        numerical_columns=[*features, "confidence"], categorical_columns=["predicted", *slice_cols]
    )
    cur_df = _frame(window.x, window.probabilities, {n: window.slices[n] for n in shared})
    ref_df = _frame(reference.x, reference.probabilities, {n: reference.slices[n] for n in shared})
    current = Dataset.from_pandas(cur_df, data_definition=definition)
    ref = Dataset.from_pandas(ref_df, data_definition=definition)
    # Tests named explicitly: Evidently's defaults switch to distances (not p-values) on large data.
    metrics = [
        DriftedColumnsCount(columns=features, num_method="ks", num_threshold=p_value),
        *_output_drift("predicted", "confidence", slice_cols, p_value),
        *(ValueDrift(column=f, method="ks", threshold=p_value) for f in features),
    ]
    with warnings.catch_warnings():  # constant pixels (image borders) make numpy warn inside the tests
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report(metrics).run(current, ref)
    values = [m["value"] for m in snapshot.dict()["metrics"]]
    out = {"drift_share": float(values[0]["share"]), **_output_metrics(values[1:], shared)}
    out.update({f"drift_p_value_{f}": float(v) for f, v in zip(features, values[3 + len(slice_cols) :])})
    return snapshot, out


def _output_drift(predicted: str, confidence: str, slice_cols: list[str], p_value: float) -> list[Any]:
    from evidently.metrics import ValueDrift

    return [
        # Categorical shares by PSI, a distance: a goodness-of-fit test would treat the reference's
        # few hundred rows as the exact population and alarm on their sampling noise.
        ValueDrift(column=predicted, method="psi", threshold=PSI_THRESHOLD),
        ValueDrift(column=confidence, method="ks", threshold=p_value),
        *(ValueDrift(column=c, method="psi", threshold=PSI_THRESHOLD) for c in slice_cols),
    ]


def _output_metrics(values: list[Any], slices: list[str]) -> dict[str, float]:
    """Metrics from the values of `_output_drift`'s metrics, in their order."""
    out = {"prediction_drift": float(values[0]), "confidence_drift": 1.0 - float(values[1])}
    slice_psi = values[2 : 2 + len(slices)]
    if slices:
        out["slice_drift"] = float(max(slice_psi))
        out.update({f"slice_drift_psi_{n}": float(v) for n, v in zip(slices, slice_psi)})
    return out


# Evidently 0.7.23's default drift test per column (`legacy/calculations/stattests/registry.py`,
# `_get_default_stattest`), chosen from the column's type in the DataDefinition, the number of
# reference rows and the distinct values of reference and window together:
#   reference <= 1000 rows  numeric, > 5 values     two-sample Kolmogorov-Smirnov    p-value
#                           numeric, 3-5 values     chi-square goodness of fit       p-value
#                           numeric, <= 2 values    Z-test of two proportions        p-value
#                           categorical, > 2 values chi-square goodness of fit       p-value
#                           categorical, <= 2       Z-test of two proportions        p-value
#   reference  > 1000 rows  numeric, > 5 values     Wasserstein distance (normed)    distance, drift at >= 0.1
#                           numeric, <= 5 values    Jensen-Shannon distance          distance, drift at >= 0.1
#                           categorical             Jensen-Shannon distance          distance, drift at >= 0.1
# Booleans are declared categorical (two values: the Z-test, or Jensen-Shannon). On the small side
# every test is a p-value, judged at `monitor.drift_p_value`; on the large side every test is a
# distance, judged at Evidently's own 0.1 (a p-value would call every tiny shift significant).
EVIDENTLY_SMALL_REFERENCE = 1000


def _unique_name(base: str, taken: set[str]) -> str:
    """An auxiliary column's name that no user column has (a table may hold a `confidence`)."""
    name = base
    while name in taken:
        name = f"_{name}"
    return name


def output_columns(schema: Any | None) -> tuple[str, str]:
    """The drift report's names for the predicted class and the confidence: "predicted" and
    "confidence", unless a table has columns of those names. The dashboard's panels select the
    drift of these two columns by name."""
    taken = set(schema.names) if schema is not None else set()
    return _unique_name("predicted", taken), _unique_name("confidence", taken)


def evidently_columns(schema: Any, table: pd.DataFrame) -> pd.DataFrame:
    """Typed columns as Evidently reads them: numbers as float; categories and booleans as text
    (NaN where missing), since Evidently counts category values and a pandas `category` or
    nullable boolean column would bring its unused levels or pd.NA along."""
    out: dict[str, Any] = {}
    for col in schema.columns:
        values = table[col.name]
        missing = values.isna().to_numpy()
        if col.kind == "numeric":
            out[col.name] = values.to_numpy(dtype=np.float64, na_value=np.nan)
        elif col.kind == "text":  # no text is missing: Evidently's descriptors divide by an empty text's length
            text = values.astype(object).map(lambda v: v if isinstance(v, str) and v.strip() else None)
            out[col.name] = text.to_numpy(dtype=object)
        else:
            text = values.astype(object).map(lambda v: str(v).lower() if isinstance(v, (bool, np.bool_)) else str(v))
            out[col.name] = text.where(~missing, np.nan).to_numpy(dtype=object)
    return pd.DataFrame(out)


TEXT_DESCRIPTORS = ("length", "non_letter_pct", "unknown_token_share")


def _text_descriptors(schema: Any, name: str) -> list[Any]:
    """Evidently's offline text descriptors of column `name` (characters, share of non-letter
    characters) and the share of its tokens that the training vocabulary spells byte by byte
    (`kd_ops.data.text.byte_share`): out-of-vocabulary words without a lexicon to download."""
    from evidently.core.datasets import DatasetColumn
    from evidently.descriptors import CustomColumnDescriptor, NonLetterCharacterPercentage, TextLength
    from evidently.legacy.core import ColumnType

    from kd_ops.data.text import byte_share, encode_texts

    column = schema.column(name)

    def unknown_share(data: Any) -> Any:
        texts = data.data.astype(object).map(lambda v: v if isinstance(v, str) else "").tolist()
        ids, _ = encode_texts(schema.tokenizer(name), texts, column.max_length)
        return DatasetColumn(type=ColumnType.Numerical, data=pd.Series(byte_share(ids), index=data.data.index))

    return [
        TextLength(name, alias=f"{name}.length"),
        NonLetterCharacterPercentage(name, alias=f"{name}.non_letter_pct"),
        CustomColumnDescriptor(name, unknown_share, alias=f"{name}.unknown_token_share"),
    ]


EMBEDDINGS = "embeddings"  # the name of the served network's embeddings in the drift report


def _embedding_columns(
    window: Window, reference: Reference, cur_df: pd.DataFrame, ref_df: pd.DataFrame, taken: set[str]
) -> list[str]:
    """Add the served model's embeddings of the window's and the reference's encoded rows
    (`Window.embed`, `kd_ops.models.embedding`) to both frames, a column per dimension; their
    names, or [] where the window carries no embedder."""
    if window.embed is None or not window.rows or not len(reference.x):
        return []
    cur, ref = window.embed(window.x), window.embed(reference.x)
    names = [_unique_name(f"{EMBEDDINGS}_{i}", taken) for i in range(cur.shape[1])]
    cur_df[names] = pd.DataFrame(cur, index=cur_df.index)
    ref_df[names] = pd.DataFrame(ref, index=ref_df.index)
    return names


def _auc_null_std(reference_rows: int, window_rows: int) -> float:
    """The standard deviation of a held-out ROC AUC under no drift (Mann-Whitney's U over n1
    reference and n2 window rows; Evidently's model method holds out half of each)."""
    n1, n2 = max(reference_rows // 2, 1), max(window_rows // 2, 1)
    return float(np.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2)))


def _embedding_drift(reference_rows: int, window_rows: int) -> Any:
    """Evidently's EmbeddingsDrift by its model method: a classifier (SGD, logistic loss) trained on
    half of the rows to tell window from reference, its ROC AUC on the other half. Its own drift
    verdict (in the report) is set at the AUC that no drift exceeds with probability 0.001."""
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    from scipy.stats import norm

    threshold = 0.5 + float(norm.isf(0.001)) * _auc_null_std(reference_rows, window_rows)
    return EmbeddingsDrift(embeddings_name=EMBEDDINGS, drift_method=ModelDriftMethod(threshold=threshold))


def _embedding_metrics(auc: float, reference_rows: int, window_rows: int) -> dict[str, float]:
    """`embedding_drift`: the AUC above chance (0 where none), judged at `monitor.rate_p_value`
    with `embedding_drift_p_value`, one-sided, from the AUC's normal approximation under no drift."""
    from scipy.stats import norm

    z = (auc - 0.5) / _auc_null_std(reference_rows, window_rows)
    return {
        "embedding_drift": max(auc - 0.5, 0.0),
        "embedding_drift_auc": auc,
        "embedding_drift_p_value": float(norm.sf(z)),
    }


def _table_drift(
    window: Window, reference: Reference, p_value: float
) -> tuple[Any, dict[str, float], dict[str, dict[str, Any]]]:
    """Drift of a table, column by column with the test Evidently picks for each column's type
    (see the table above), on the typed columns as the model read them (an unseen category is
    missing here: the unseen-category signal counts it). A column with no value left in the
    window (every value missing or unseen) while the reference had some counts as drifted: a
    client that stops sending a field is the plainest drift there is. A text column is tested
    through its descriptors (`TEXT_DESCRIPTORS`), each a column of the report; the text counts as
    drifted when any of them is."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    schema = window.schema
    assert schema is not None and window.table is not None
    ref_table = reference.table if reference.schema is not None else None
    if ref_table is None:  # a reference stored before it kept typed columns: decode its encoded rows
        from kd_ops.evaluation.reference import typed_columns

        ref_table = typed_columns(schema, reference.x)
    cur_df, ref_df = evidently_columns(schema, window.table), evidently_columns(schema, ref_table)
    features = list(schema.names)
    empty = {
        f: ("window" if cur_df[f].isna().all() else "reference")
        for f in features
        if cur_df[f].isna().all() or ref_df[f].isna().all()
    }
    kinds = {c.name: c.kind for c in schema.columns}
    texts = [f for f in features if kinds[f] == "text" and f not in empty]
    described = {f"{t}.{d}": t for t in texts for d in TEXT_DESCRIPTORS}
    tested = [f for f in features if f not in empty and kinds[f] != "text"] + list(described)

    taken = set(features)
    predicted, confidence = output_columns(schema)
    shared = sorted(set(window.slices) & set(reference.slices))
    slice_cols = [_unique_name(f"slice_{n}", taken) for n in shared]
    for df, probs, slices in (
        (cur_df, window.probabilities, window.slices),
        (ref_df, reference.probabilities, reference.slices),
    ):
        df[predicted] = probs.argmax(axis=1).astype(str)
        df[confidence] = probs.max(axis=1)
        for name, col in zip(shared, slice_cols):
            df[col] = np.asarray(slices[name], dtype=str)
    embedded = _embedding_columns(window, reference, cur_df, ref_df, taken | {predicted, confidence, *slice_cols})
    definition = DataDefinition(
        numerical_columns=[*(f for f in features if kinds[f] == "numeric"), confidence],
        categorical_columns=[*(f for f in features if kinds[f] in ("categorical", "boolean")), predicted, *slice_cols],
        text_columns=[f for f in features if kinds[f] == "text"],
        embeddings={EMBEDDINGS: embedded} if embedded else None,
    )
    descriptors = [d for t in texts for d in _text_descriptors(schema, t)]
    threshold = p_value if len(ref_df) <= EVIDENTLY_SMALL_REFERENCE else None
    metrics = [
        *_output_drift(predicted, confidence, slice_cols, p_value),
        *(ValueDrift(column=f, threshold=threshold) for f in tested),
    ]
    if tested:  # Evidently's own table of drifted columns, for the report's reader
        metrics.insert(0, DriftedColumnsCount(columns=tested, threshold=threshold))
    if embedded:
        metrics.append(_embedding_drift(len(ref_df), len(cur_df)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant columns, pandas' downcasting notes inside Evidently
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(cur_df, data_definition=definition, descriptors=descriptors or None),
            Dataset.from_pandas(ref_df, data_definition=definition, descriptors=[*descriptors] or None),
        )
    report = snapshot.dict()
    results = report["metrics"][1:] if tested else report["metrics"]
    failed = {
        t["metric_config"]["metric_id"] for t in report.get("tests", []) if t.get("status") in ("FAIL", "WARNING")
    }
    out = _output_metrics([m["value"] for m in results], shared)
    columns: dict[str, dict[str, Any]] = {}
    n_outputs = 2 + len(slice_cols)
    for f, m in zip(tested, results[n_outputs:]):
        columns[f] = {
            "kind": "text descriptor" if f in described else kinds[f],
            "test": m["config"].get("method"),
            "score": float(m["value"]),
            "threshold": m["config"].get("threshold"),
            "drifted": m["id"] in failed,
        }
        out[f"drift_score_{f}"] = float(m["value"])
    for f, where in empty.items():
        columns[f] = {
            "kind": kinds[f],
            "test": None,
            "score": None,
            "threshold": None,
            "drifted": where == "window",
            "note": f"no value in the {where} (missing or unseen)",
        }
    for t in texts:  # a text column: drifted if any of its descriptors is
        parts = [d for d, of in described.items() if of == t]
        columns[t] = {
            "kind": "text",
            "test": "descriptors",
            "score": max(columns[d]["score"] for d in parts)
            if threshold is None
            else min(columns[d]["score"] for d in parts),
            "threshold": columns[parts[0]]["threshold"],
            "drifted": any(columns[d]["drifted"] for d in parts),
            "descriptors": {d.split(".", 1)[1]: columns[d] for d in parts},
        }
    if embedded:
        out.update(_embedding_metrics(float(results[-1]["value"]), len(ref_df), len(cur_df)))
    drifted = [f for f in features if columns[f]["drifted"]]
    out["drift_share"] = len(drifted) / len(features)
    out["drifted_columns"] = float(len(drifted))
    return snapshot, out, {f: columns[f] for f in features}


def unseen_metrics(window: Window) -> tuple[dict[str, float], list[str]]:
    """Share of the window's rows holding at least one category the training split never held,
    and the share per categorical column; with the columns that hold any, most affected first.

    Not a drift test: the model has never seen such a value, and encodes it as missing, so
    even a few rows of it are a fact about the traffic (a new product code, a renamed carrier,
    an upstream change of spelling), not sampling noise. Empty for array models."""
    if window.schema is None or not window.rows:
        return {}, []
    out = {"unseen_category_share": float(window.unseen_rows.mean())}
    shares = {name: float(mask.mean()) for name, mask in window.unseen.items()}
    out.update({f"unseen_category_share_{name}": share for name, share in shares.items()})
    named = sorted((n for n, s in shares.items() if s > 0), key=lambda n: (-shares[n], n))
    return out, named


def truncated_metrics(window: Window) -> dict[str, float]:
    """Per text column the share of the window's texts longer than its `max_length`, which the
    model read cut to their first `max_length` tokens. Not a test either: a rising share says
    the traffic's texts grew beyond what the model was built to read (raise `data.max_length`
    and re-distil). Empty without text columns."""
    if not window.rows:
        return {}
    return {f"truncated_text_share_{name}": float(mask.mean()) for name, mask in window.truncated.items()}


def quality_metrics(
    window: Window, reference: Reference, cfg: MonitorConfig
) -> tuple[Any, dict[str, float], list[str]]:
    """Accuracy drop on labelled rows, overall (with Evidently's classification report) and per
    slice, each slice on its own rows. The snapshot is None when too few rows are labelled."""
    out: dict[str, float] = {}
    skipped: list[str] = []
    window = window.labelled  # the window's labelled rows, or the longer feedback window's
    labelled = np.isfinite(window.labels)
    if labelled.sum() < cfg.min_labelled_rows:
        skipped.append(f"accuracy: {int(labelled.sum())} labelled rows < min_labelled_rows {cfg.min_labelled_rows}")
        return None, out, skipped
    # Feedback labels are true labels: the reference's rows labelled by a teacher (a re-distilled
    # version's recent traffic) are left out of the comparison, which would measure agreement.
    true = reference.true_rows
    if true.sum() < cfg.min_labelled_rows:
        skipped.append(
            f"accuracy: the reference holds {int(true.sum())} rows with a true label < min_labelled_rows"
            f" {cfg.min_labelled_rows} (the rest were labelled by the teacher)"
        )
        return None, out, skipped
    pred, labels = window.predicted[labelled], window.labels[labelled].astype(int)
    snapshot, out["accuracy"] = quality_report(pred, labels, reference)
    out["accuracy_drop"] = reference.true_accuracy - out["accuracy"]
    reference_hits = reference.predicted == reference.labels
    out["accuracy_drop_p_value"] = drop_p_value(pred == labels, reference_hits[true])
    judged: list[tuple[float, float]] = []  # (drop, p-value) per slice
    for name, values in window.slices.items():
        ref_values = reference.slices.get(name)
        for level in sorted(set(values[labelled]) - {""}):
            rows = values[labelled] == level
            if rows.sum() < cfg.min_slice_rows:
                skipped.append(f"slice {name}={level}: {int(rows.sum())} labelled rows < min_slice_rows")
                continue
            acc = evidently_accuracy(pred[rows], labels[rows])
            out[f"accuracy_slice_{name}_{level}"] = acc
            in_ref = None if ref_values is None else true & (ref_values == level)  # true-labelled rows only
            if in_ref is not None and in_ref.sum() >= cfg.min_slice_rows:
                drop = _accuracy(reference.predicted[in_ref], reference.labels[in_ref]) - acc
                out[f"accuracy_drop_slice_{name}_{level}"] = drop
                judged.append((drop, drop_p_value(pred[rows] == labels[rows], reference_hits[in_ref])))
    if judged:
        # p-values Bonferroni-corrected over the slices compared (or some slice would always look
        # significant); the signal is the worst significant drop, else the worst drop.
        judged = [(drop, min(1.0, p * len(judged))) for drop, p in judged]
        significant = [j for j in judged if j[1] < cfg.rate_p_value]
        out["slice_accuracy_drop"], out["slice_accuracy_drop_p_value"] = max(significant or judged)
    return snapshot, out, skipped


def label_free_metrics(window: Window, reference: Reference, cfg: MonitorConfig) -> tuple[dict[str, float], list[str]]:
    out: dict[str, float] = {}
    skipped: list[str] = []
    out["estimated_accuracy"] = confidence_estimate(reference, window.confidence)
    out["estimated_accuracy_drop"] = reference.accuracy - out["estimated_accuracy"]
    out["estimated_accuracy_drop_p_value"] = estimate_drop_p_value(out["estimated_accuracy"], window.rows, reference)
    shadowed = np.isfinite(window.teacher_class)
    if reference.teacher_probabilities is None:
        skipped.append("agreement: the reference has no teacher probabilities")
    elif shadowed.sum() < cfg.min_labelled_rows:
        skipped.append(f"agreement: {int(shadowed.sum())} shadow-scored rows < min_labelled_rows")
    else:
        hits = window.predicted[shadowed] == window.teacher_class[shadowed]
        reference_hits = reference.predicted == reference.teacher_probabilities.argmax(axis=1)
        out["agreement_with_teacher"] = float(hits.mean())
        out["agreement_drop"] = float(reference_hits.mean()) - out["agreement_with_teacher"]
        out["agreement_drop_p_value"] = drop_p_value(hits, reference_hits)
    return out, skipped
