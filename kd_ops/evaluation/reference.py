"""The reference a monitor compares production traffic with: what the student saw and said when it
was distilled.

Stored with the student's run (so with every model version made from it) as one compressed `.npz`:
validation inputs, true labels, the student's and the teacher's probabilities, and the input
slices. Drift is measured against these inputs, a confidence-based accuracy estimate is calibrated
on these predictions, and agreement with the teacher has its baseline here. `.npz` loads without
pickle (`allow_pickle=False`), so reading a reference never runs code.

For a table it also holds the rows as typed columns under the user's names (numeric, boolean,
categorical, as the model read them), the table's schema and the slicer. Drift is tested column
by column with the test that fits each column's type, which float rows cannot tell (a category
index is not a number to compare by K-S), and the monitor needs nothing but this one file to
read a table window: the schema encodes the logged records, the slicer cuts rows the server
logged without slices. References stored before these keys existed still load (None for each).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_ops.core.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from kd_ops.data.slicing import Slicer
    from kd_ops.data.tables import TableSchema

REFERENCE_ARTIFACT = "reference/reference.npz"


class ReferenceMissing(ConfigError):
    """The model version has no stored reference (distilled before kd-ops stored one, or deleted)."""


@dataclass(frozen=True)
class Reference:
    x: np.ndarray  # (n, features) float32: raw rows as served (images), encoded rows (tables)
    labels: np.ndarray  # (n,) int64
    probabilities: np.ndarray  # (n, classes) float32, the student's
    teacher_probabilities: np.ndarray | None = None
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # slice name -> (n,) str
    split: str = "val"
    # Tables only (None for images and for references stored before kd-ops kept them):
    schema: "TableSchema | None" = None  # the student's table schema
    frame: "pd.DataFrame | None" = None  # the rows as typed columns, the user's names (`typed_columns`)
    slicer: dict[str, Any] | None = None  # the student's slicer (`slices.json`), any model
    # A re-distilled version's reference is recent traffic labelled by feedback where it arrived
    # and by the teacher elsewhere: (n,) bool, True where the label is a true one. None: all are
    # (a validation split). Accuracy on feedback is compared with the true-labelled rows only.
    known: np.ndarray | None = None

    @property
    def table(self) -> "pd.DataFrame | None":
        """The rows as typed columns: as stored, or decoded from `x` when only the schema is known."""
        if self.frame is not None:
            return self.frame
        return typed_columns(self.schema, self.x) if self.schema is not None else None

    def input_slicer(self) -> "Slicer | None":
        from kd_ops.data.slicing import slicer_from_dict

        return slicer_from_dict(self.slicer) if self.slicer else None

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    @property
    def accuracy(self) -> float:
        """Against the reference's labels, whatever their source: what the label-free estimates
        (set on these labels) are comparable with."""
        return float((self.predicted == self.labels).mean())

    @property
    def true_rows(self) -> np.ndarray:
        """(n,) bool: the rows whose label is a true one."""
        return np.ones(len(self.labels), dtype=bool) if self.known is None else self.known.astype(bool)

    @property
    def true_accuracy(self) -> float:
        """On the true-labelled rows only: what accuracy on feedback labels is comparable with
        (a teacher's label would measure agreement with the teacher instead). NaN if none."""
        rows = self.true_rows
        return float((self.predicted[rows] == self.labels[rows]).mean()) if rows.any() else float("nan")

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {
            "x": self.x,
            "labels": self.labels,
            "probabilities": self.probabilities,
            "split": np.array(self.split),
        }
        if self.teacher_probabilities is not None:
            arrays["teacher_probabilities"] = self.teacher_probabilities
        arrays.update({f"slice_{k}": np.asarray(v, dtype=str) for k, v in self.slices.items()})
        if self.slicer is not None:
            arrays["slicer"] = np.array(json.dumps(self.slicer))
        if self.known is not None:
            arrays["known"] = self.known.astype(bool)
        if self.schema is not None:
            arrays["table_schema"] = np.array(json.dumps(self.schema.to_dict()))
            if self.frame is not None:
                arrays.update(_column_arrays(self.schema, self.frame))
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path | str) -> "Reference":
        with np.load(path, allow_pickle=False) as data:
            schema, frame = None, None
            if "table_schema" in data:
                from kd_ops.data.tables import TableSchema

                schema = TableSchema.from_dict(json.loads(str(data["table_schema"])))
                if "table_0" in data:
                    frame = _columns_from_arrays(schema, data)
            return cls(
                x=data["x"].astype(np.float32),
                labels=data["labels"].astype(np.int64),
                probabilities=data["probabilities"].astype(np.float32),
                teacher_probabilities=data["teacher_probabilities"] if "teacher_probabilities" in data else None,
                slices={k.removeprefix("slice_"): data[k] for k in data.files if k.startswith("slice_")},
                split=str(data["split"]) if "split" in data else "val",
                schema=schema,
                frame=frame,
                slicer=json.loads(str(data["slicer"])) if "slicer" in data else None,
                known=data["known"].astype(bool) if "known" in data else None,
            )


def typed_columns(schema: "TableSchema", x: np.ndarray) -> "pd.DataFrame":
    """Encoded rows as the user's columns with their types, as the model read them: numeric as
    float, boolean as pandas' nullable boolean, categorical as `category` over the training
    vocabulary. A category the training split never held is missing here, as it is to the model
    (the monitor's unseen-category signal counts those from the raw records)."""
    return schema.decode(x)


# Typed columns in a .npz without pickle: by position (a column name may not be a file name in the
# archive), numbers as floats with NaN, categories as text beside a mask of the missing ones.
def _column_arrays(schema: "TableSchema", frame: "pd.DataFrame") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for j, col in enumerate(schema.columns):
        values = frame[col.name]
        missing = values.isna().to_numpy()
        if col.kind in ("categorical", "text"):
            text = values.astype(object).where(~missing, "").map(str)
            out[f"table_{j}"] = np.asarray(text.tolist(), dtype=str)
            out[f"table_missing_{j}"] = missing
        else:
            out[f"table_{j}"] = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _columns_from_arrays(schema: "TableSchema", data: Any) -> "pd.DataFrame":
    import pandas as pd

    columns: dict[str, Any] = {}
    for j, col in enumerate(schema.columns):
        values = data[f"table_{j}"]
        if col.kind == "numeric":
            columns[col.name] = values.astype(np.float64)
        elif col.kind == "boolean":
            columns[col.name] = pd.array(np.where(np.isnan(values), None, values > 0.5), dtype="boolean")
        else:
            text = pd.Series(values.astype(object)).where(~data[f"table_missing_{j}"], None)
            columns[col.name] = text if col.kind == "text" else pd.Categorical(text, categories=list(col.categories))
    return pd.DataFrame(columns)


def probabilities(model: Any, x: np.ndarray) -> np.ndarray:
    """Class probabilities of any kd-ops model for rows `x`: a network's softmax, or the
    `predict_proba` of an estimator (scikit-learn, or a boosted or registered table model behind
    `EstimatorTeacher`). Called directly, not through an evaluation candidate, whose size
    measures (a pickle of the model) neither a prediction needs nor every model allows.

    `x` are encoded rows; a registered table model (`TableModel`, as `load_model` gives it back)
    reads them through `encoded_proba`, its `predict_proba` taking raw records."""
    predict = getattr(model, "encoded_proba", None) or getattr(model, "predict_proba", None)
    if predict is not None:
        out = np.asarray(predict(x), dtype=np.float64)
        out = np.clip(out, 0.0, None)
        return (out / np.clip(out.sum(axis=1, keepdims=True), 1e-12, None)).astype(np.float32)
    import torch

    from kd_ops.models.zoo import freeze

    with torch.inference_mode():
        logits = freeze(model.cpu())(torch.as_tensor(x, dtype=torch.float32))
        return torch.softmax(logits.double(), dim=1).numpy().astype(np.float32)


def build_reference(
    student: Any,
    teacher: Any | None,
    dm: Any,
    split: str = "val",
    rows: tuple[np.ndarray, np.ndarray] | None = None,
    known: np.ndarray | None = None,
) -> Reference:
    """The student's (and teacher's) view of `split` of the datamodule `dm`, or of `rows` (x, labels):
    a re-distilled student's reference is the recent traffic it was made for (`split="production"`),
    else a monitor would keep comparing the traffic it adapted to with the distribution it left;
    `known` says which of those rows carry a true (feedback) label rather than the teacher's.

    On a table, `x` (and `rows`) are encoded rows; the reference adds their typed columns, the
    schema and the slicer (see the module docstring)."""
    x, y = rows if rows is not None else dm.arrays(split)
    x = np.asarray(x, dtype=np.float32)
    slicer = dm.input_slices()
    schema = getattr(dm, "schema", None)
    return Reference(
        x=x,
        labels=np.asarray(y, dtype=np.int64),
        probabilities=probabilities(student, x),
        teacher_probabilities=probabilities(teacher, x) if teacher is not None else None,
        slices={k: np.asarray(v, dtype=str) for k, v in slicer.compute(x).items()},
        split=split,
        schema=schema,
        frame=typed_columns(schema, x) if schema is not None else None,
        slicer=slicer.to_dict(),
        known=None if known is None else np.asarray(known, dtype=bool),
    )


def log_reference(reference: Reference) -> None:
    """Into the active MLflow run, as `REFERENCE_ARTIFACT`."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="kd-ops-reference-") as tmp:
        path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
        reference.save(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(REFERENCE_ARTIFACT).parent))


def load_reference(name: str, version: str, tracking_uri: str | None = None) -> Reference:
    """The reference of model version `name`/`version`; `ReferenceMissing` naming both if there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise ReferenceMissing(f"model {name!r} has no version {version}") from None
    if not mv.run_id:
        raise ReferenceMissing(f"{name} v{version} was not logged from a run, so it has no stored reference")
    try:
        path = client.download_artifacts(mv.run_id, REFERENCE_ARTIFACT)
    except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise ReferenceMissing(
            f"{name} v{version} has no stored reference ({REFERENCE_ARTIFACT} in run {mv.run_id}); "
            "re-distil it with this kd-ops to monitor it"
        ) from None
    return Reference.load(path)
