"""A model on a table as a user holds it: raw records with the original columns in, the user's classes out.

`TableModel` pairs the schema fitted on the training split (`kd_ops.data.tables.TableSchema`)
with a model over encoded rows (an exported network, a scikit-learn estimator, a LightGBM or
XGBoost booster). It is what kd-ops registers for a table and what `kd_ops.models.loading`
gives back for one: `predict_proba(frame)` and `predict(frame)` take a DataFrame (or a list of
records) with the original column names and types; `encoded_proba(x)` skips the encoding, for
the server and the pipeline, which hold encoded rows already.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kd_ops.data.tables import TableSchema


class TableModel:
    """Raw records -> class probabilities (columns in `schema.classes` order) and labels."""

    def __init__(self, schema: TableSchema, inner: Any, kind: str):
        self.schema, self.inner, self.kind = schema, inner, kind

    @property
    def classes_(self) -> np.ndarray:
        """The user's classes, as scikit-learn names them (so a table model is a teacher by URI too)."""
        return np.asarray(self.schema.classes, dtype=object)

    def encoded_proba(self, x: np.ndarray) -> np.ndarray:
        from kd_ops.models.estimators import raw_probabilities

        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.kind == "pt2":
            import torch

            with torch.inference_mode():
                return torch.softmax(self.inner(torch.from_numpy(x)), dim=1).numpy().astype(np.float64)
        return raw_probabilities(self.inner, x)

    def _frame(self, data: Any):
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            return data
        if isinstance(data, dict):
            return pd.DataFrame([data])
        return pd.DataFrame.from_records(list(data))

    def predict_proba(self, data: Any) -> np.ndarray:
        """A DataFrame, one record (dict) or a list of records with the original columns."""
        return self.encoded_proba(self.schema.encode(self._frame(data), where="input"))

    def predict(self, data: Any) -> np.ndarray:
        classes = np.asarray(self.schema.classes, dtype=object)
        return classes[self.predict_proba(data).argmax(1)]
