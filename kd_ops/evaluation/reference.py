"""The reference a monitor compares production traffic with: what the student saw and said when it
was distilled.

Stored with the student's run (so with every model version made from it) as one compressed `.npz`:
validation inputs, true labels, the student's and the teacher's probabilities, and the input
slices. Drift is measured against these inputs, a confidence-based accuracy estimate is calibrated
on these predictions, and agreement with the teacher has its baseline here. `.npz` loads without
pickle (`allow_pickle=False`), so reading a reference never runs code.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_ops.core.errors import ConfigError

REFERENCE_ARTIFACT = "reference/reference.npz"


class ReferenceMissing(ConfigError):
    """The model version has no stored reference (distilled before kd-ops stored one, or deleted)."""


@dataclass(frozen=True)
class Reference:
    x: np.ndarray  # (n, features) float32, raw rows as served
    labels: np.ndarray  # (n,) int64
    probabilities: np.ndarray  # (n, classes) float32, the student's
    teacher_probabilities: np.ndarray | None = None
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # slice name -> (n,) str
    split: str = "val"

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean())

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
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path | str) -> "Reference":
        with np.load(path, allow_pickle=False) as data:
            return cls(
                x=data["x"].astype(np.float32),
                labels=data["labels"].astype(np.int64),
                probabilities=data["probabilities"].astype(np.float32),
                teacher_probabilities=data["teacher_probabilities"] if "teacher_probabilities" in data else None,
                slices={k.removeprefix("slice_"): data[k] for k in data.files if k.startswith("slice_")},
                split=str(data["split"]) if "split" in data else "val",
            )


def probabilities(model: Any, x: np.ndarray) -> np.ndarray:
    """Class probabilities of any kd-ops model (torch or scikit-learn) for raw rows `x`."""
    from kd_ops.evaluation.metrics import model_candidate

    # Candidates give logits (torch) or log-probabilities (sklearn): a softmax maps both to probabilities.
    out = model_candidate(model, "reference").predict(x).astype(np.float64)
    out = np.exp(out - out.max(axis=1, keepdims=True))
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def build_reference(
    student: Any, teacher: Any | None, dm: Any, split: str = "val", rows: tuple[np.ndarray, np.ndarray] | None = None
) -> Reference:
    """The student's (and teacher's) view of `split` of the datamodule `dm`, or of `rows` (x, labels):
    a re-distilled student's reference is the recent traffic it was made for (`split="production"`),
    else a monitor would keep comparing the traffic it adapted to with the distribution it left."""
    x, y = rows if rows is not None else dm.arrays(split)
    x = np.asarray(x, dtype=np.float32)
    return Reference(
        x=x,
        labels=np.asarray(y, dtype=np.int64),
        probabilities=probabilities(student, x),
        teacher_probabilities=probabilities(teacher, x) if teacher is not None else None,
        slices={k: np.asarray(v, dtype=str) for k, v in dm.input_slices().compute(x).items()},
        split=split,
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
