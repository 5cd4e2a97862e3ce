"""The monitor on a table with a text column, without a trained model: texts cut to `max_length`
are counted per row and reported as a share; embedding drift (a classifier two-sample test on a
network's head input, Evidently's EmbeddingsDrift) leaves same-distribution traffic alone and
flags a vocabulary shift, and is named in the verdict. Real Evidently reports."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from kd_ops.config.monitoring import MonitorConfig
from kd_ops.evaluation.reference import Reference
from kd_ops.models.embedding import Embedder, head_path
from kd_ops.models.zoo import build_model
from monitors.decision import judge
from monitors.window import window_from_frame

from ..conftest import client_records
from ..data.test_text import WORDS, _frame, _prepared

NEW_WORDS = ["zorbly", "quexing", "flimbar", "snorp", "vantric", "plomb", "ruddex", "glorp"]


def _records_frame(texts: list[str | None], seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(texts)
    current = pd.DataFrame({"review": texts, "stars": rng.integers(1, 6, n)})
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(n)],
            "created_at": pd.Timestamp("2026-01-01"),
            "model_version": "1",
            "inputs": client_records(current),
            "probabilities": list(rng.dirichlet([1, 1], n)),
            "predicted_class": 0,
            "confidence": 0.5,
        }
    )


@pytest.fixture(scope="module")
def text_case():
    table = _prepared(_frame(1200), max_length=16)
    schema = table.schema
    rng = np.random.default_rng(1)
    ref_x = schema.encode(_frame(600, seed=1).drop(columns="label"))
    reference = Reference(
        ref_x, rng.integers(0, 2, 600), rng.dirichlet([1, 1], 600).astype(np.float32), schema=schema
    )
    torch.manual_seed(0)
    net = build_model("embedding_bag", {"dim": 8}, (schema.width,), 2, table=schema).eval()
    return schema, reference, Embedder(net)


def test_texts_cut_to_max_length_are_counted_per_row_and_as_a_share(text_case):
    schema, reference, _ = text_case
    texts = ["good film", "good " * 40, None, "", "dull " * 17, "fine"] * 50
    window = window_from_frame(_records_frame(texts), "m", schema.width, 2, schema=schema)
    assert window.truncated["review"][:6].tolist() == [False, True, False, False, True, False]
    assert window.describe()["truncated_texts_review"] == 100
    out = judge(window, reference, MonitorConfig(store="sqlite://", min_rows=100))
    assert out.metrics["truncated_text_share_review"] == pytest.approx(100 / 300)
    assert out.columns["review"]["truncated_share"] == pytest.approx(100 / 300)


def test_the_head_of_a_network_is_its_last_linear_layer(text_case):
    schema, _, embedder = text_case
    mlp = build_model("mlp", {"hidden": [12]}, (schema.width,), 2, table=schema)
    assert head_path(mlp) == "net.2" and embedder.path == "net.1"
    emb = embedder(schema.encode(_frame(5).drop(columns="label")))
    assert emb.shape == (5, 8 + 1)  # the pooled text (dim 8) beside the scaled `stars`


def _texts(n: int, seed: int, vocabulary: list[str]) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocabulary, size=rng.integers(3, 12))) for _ in range(n)]


@pytest.mark.parametrize("shifted", [False, True])
def test_embedding_drift_flags_new_vocabulary_and_leaves_clean_traffic_alone(text_case, shifted):
    schema, reference, embedder = text_case
    vocabulary = WORDS[: len(WORDS) // 2] + NEW_WORDS if shifted else list(WORDS)
    window = window_from_frame(_records_frame(_texts(600, 7, vocabulary)), "m", schema.width, 2, schema=schema)
    window = dataclasses.replace(window, embed=embedder)
    out = judge(window, reference, MonitorConfig(store="sqlite://", min_rows=100))
    m = out.metrics
    assert {"embedding_drift", "embedding_drift_auc", "embedding_drift_p_value"} <= set(m)
    flagged = [r for r in out.reasons if r.signal == "embedding_drift"]
    if shifted:
        assert m["embedding_drift_p_value"] < 0.001 and flagged and flagged[0].columns == ("review",), m
    else:
        assert m["embedding_drift_p_value"] > 0.001 and not flagged, m
    kinds = [metric["config"].get("type", "") for metric in out.snapshots["drift"].dict()["metrics"]]
    assert any("EmbeddingsDrift" in kind for kind in kinds), kinds
