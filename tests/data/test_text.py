"""Text columns: the tokenizer is fitted on the training split only, a text becomes a block of
token ids in the encoded row, and awkward texts (empty, missing, overlong, not a string) each
have a defined behaviour or a clear error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from kd_ops.config.loading import config_from_dict
from kd_ops.core.errors import ConfigError
from kd_ops.data.datamodule import DistillDataModule
from kd_ops.data.slicing import ColumnSlices
from kd_ops.data.tables import TableSchema, TableSpec, prepare_table
from kd_ops.data.text import PAD, byte_share, decode_texts, encode_texts, token_counts, train_tokenizer
from kd_ops.models.zoo import build_model

WORDS = "good bad great awful film movie plot acting script boring moving funny dull brilliant".split()


def _frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = rng.choice(WORDS, size=rng.integers(3, 12))
        texts.append(" ".join(words))
        labels.append(
            "pos" if sum(w in ("good", "great", "moving", "funny", "brilliant") for w in words) > 1 else "neg"
        )
    return pd.DataFrame({"review": texts, "stars": rng.integers(1, 6, size=n), "label": labels})


def _prepared(frame: pd.DataFrame, max_length: int = 16, train: np.ndarray | None = None):
    spec = TableSpec(label="label", text=["review"], max_length=max_length, vocab_size=300)
    rows = train if train is not None else np.arange(len(frame) // 2)
    return prepare_table(frame, spec, "test frame", lambda y, order: rows)


def test_a_text_column_takes_max_length_slots_and_other_columns_follow_it():
    table = _prepared(_frame(), max_length=64)
    schema = table.schema
    assert [c.kind for c in schema.columns] == ["text", "numeric"]
    assert schema.width == 65 and table.x.shape == (300, 65)
    assert schema.position("review") == 0 and schema.position("stars") == 64
    assert np.array_equal(table.x[:, 64], _frame()["stars"].to_numpy(dtype=np.float32))
    # the decoded text is the text as the model reads it (lowercased, normalised)
    assert schema.decode(table.x[:3])["review"].str.strip().tolist() == _frame()["review"][:3].tolist()


def test_the_tokenizer_learns_from_the_training_rows_only():
    frame = _frame()
    frame.loc[150:, "review"] = "zyzzyva quixotic " * 3  # words only val/test rows hold
    schema = _prepared(frame, train=np.arange(150)).schema
    ids, _ = encode_texts(schema.tokenizer("review"), ["zyzzyva quixotic"], 16)
    assert token_counts(ids)[0] > 4  # spelt in small pieces, not one learnt token per word
    known, _ = encode_texts(schema.tokenizer("review"), ["brilliant"], 16)
    assert token_counts(known)[0] == 1


def test_awkward_texts_have_a_defined_behaviour():
    schema = _prepared(_frame(), max_length=8).schema
    frame = pd.DataFrame({"review": ["", "   ", None, np.nan, "good " * 40, "good"], "stars": [1] * 6})
    x, truncated = schema.encode_counting(frame)
    assert token_counts(x[:, :8]).tolist()[:4] == [0, 0, 0, 0]  # empty, blank and missing: no tokens
    assert token_counts(x[:, :8])[4] == 8 and truncated["review"].tolist() == [0, 0, 0, 0, 1, 0]  # cut, counted
    assert not np.isnan(x).any()
    with pytest.raises(ConfigError, match=r"column 'review' is text but row 1 holds 42 \(int\)"):
        schema.encode(pd.DataFrame({"review": ["fine", 42], "stars": [1, 2]}), where="request")


def test_networks_read_empty_texts_without_nan_and_export():
    table = _prepared(_frame())
    for name, params in (
        ("embedding_bag", {"bigram_buckets": 64}),
        ("transformer", {"dim": 16, "heads": 2}),
        ("mlp", {}),
    ):
        model = build_model(name, params, (table.schema.width,), 2, table=table.schema).eval()
        x = torch.as_tensor(table.x[:4].copy())
        x[0, :16] = PAD  # an empty text
        out = model(x)
        assert out.shape == (4, 2) and torch.isfinite(out).all(), name
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        assert torch.allclose(program.module()(x[:3]), out[:3], atol=1e-5), name


def test_a_text_model_on_a_table_without_text_is_a_clear_error():
    with pytest.raises(ValueError, match=r"embedding_bag reads text.*data.text"):
        build_model("embedding_bag", {}, (64,), 10)


def test_the_schema_round_trips_through_json_with_its_tokenizer():
    schema = _prepared(_frame()).schema
    back = TableSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert back.same_encoding(schema) and back.width == schema.width
    frame = _frame(20, seed=3)
    assert np.array_equal(back.encode(frame), schema.encode(frame))


def test_a_stored_model_without_its_tokenizer_is_a_clear_error_and_its_folder_is_left_alone(tmp_path):
    from kd_ops.models.table_flavor import read_model_folder, write_model_folder

    schema = _prepared(_frame()).schema
    net = build_model("embedding_bag", {"dim": 4}, (schema.width,), 2, table=schema).eval()
    folder = write_model_folder(net, schema, tmp_path / "model", schema.encode(_frame(4).drop(columns="label")))
    stored = json.loads((folder / "schema.json").read_text())
    for value, why in ((None, "its tokenizer is missing"), ("{not json", "its tokenizer cannot be read")):
        stored["columns"][0]["tokenizer"] = value
        (folder / "schema.json").write_text(json.dumps(stored))
        with pytest.raises(ConfigError, match=rf"not a readable kd-ops table model \(text column 'review': {why}"):
            read_model_folder(folder)
    assert (folder / "schema.json").read_text() == json.dumps(stored)  # nothing rewritten


def test_text_slices_are_length_terciles_and_empty():
    table = _prepared(_frame())
    spec_slices = TableSpec(label="label", text=["review"], slices=["review"], max_length=16, vocab_size=300)
    schema = prepare_table(_frame(), spec_slices, "t", lambda y, o: np.arange(150)).schema
    slicer = ColumnSlices.fit(schema, table.x[:150])
    x = table.x[:50].copy()
    x[0, :16] = PAD
    cut = slicer.compute(x)["review"]
    assert cut[0] == "empty" and set(cut[1:]) <= {"low", "mid", "high"} and len(set(cut[1:])) == 3


def test_byte_share_rises_with_words_the_vocabulary_never_saw():
    tok = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
    known, _ = encode_texts(tok, ["good film great acting"], 16)
    new, _ = encode_texts(tok, ["xqzv jkwp vvbn"], 16)
    assert byte_share(new)[0] > 0.9 and byte_share(known)[0] < 0.5
    assert decode_texts(tok, known)[0].strip() == "good film great acting"


@pytest.mark.slow
def test_rotten_tomatoes_loads_as_a_text_table():
    cfg = config_from_dict({"data": {"name": "rotten-tomatoes"}}).data
    dm = DistillDataModule(cfg, 0)
    dm.setup()
    schema = dm.schema
    assert schema.classes == ("fresh", "rotten") and [c.kind for c in schema.columns] == ["text"]
    assert dm.raw.x.shape == (12_808, 64) and schema.slices == ("text",)
    assert 0.5 < np.mean(dm.raw.y == 0) < 0.6  # 7,403 fresh of 12,808


def test_the_scikit_learn_student_reads_texts_as_tfidf_and_saves_pickle_free(tmp_path):
    import skops.io
    from scipy import sparse

    from kd_ops.models.safe_load import load_skops_file
    from kd_ops.models.sklearn_students import fit_soft, table_preprocessor

    table = _prepared(_frame(), max_length=32)
    x, y = table.x, table.y
    assert sparse.issparse(table_preprocessor(table.schema).fit_transform(x[:150]))
    soft = np.eye(2)[y] * 0.8 + 0.1
    student = fit_soft("logistic_regression", {"C": 10.0}, x[:150], soft[:150], seed=0, schema=table.schema)
    assert (student.predict(x[150:]) == y[150:]).mean() > 0.8  # the words decide the label
    skops.io.dump(student, tmp_path / "s.skops")
    back = load_skops_file(tmp_path / "s.skops", "test", allow_pickle=False)
    np.testing.assert_allclose(back.predict_proba(x[150:]), student.predict_proba(x[150:]))


def test_students_and_teachers_that_cannot_read_text_are_refused(tracking_uri):
    from kd_ops.models.sklearn_students import fit_soft
    from kd_ops.pipeline.distillation import run_distillation

    table = _prepared(_frame(), max_length=16)
    soft = np.eye(2)[table.y]
    with pytest.raises(ConfigError, match="takes no sparse input.*use logistic_regression"):
        fit_soft("gradient_boosting", {}, table.x[:150], soft[:150], seed=0, schema=table.schema)
    raw = {
        "data": {"label": "label", "text": ["review"], "max_length": 16, "vocab_size": 300},
        "teacher": {"model": "lightgbm"},
        "tracking": {"uri": tracking_uri, "experiment": "text-refusals"},
        "train": {"progress_bar": False},
    }
    with pytest.raises(ConfigError, match="a boosted ensemble would read a text's token ids as numbers"):
        run_distillation(config_from_dict(raw, "t"), data=_frame())


def test_probabilities_reads_a_registered_table_model_through_its_encoded_rows():
    from kd_ops.evaluation.reference import probabilities
    from kd_ops.models.table_model import TableModel
    from kd_ops.models.zoo import freeze

    schema = _prepared(_frame()).schema
    net = freeze(build_model("embedding_bag", {"dim": 4}, (schema.width,), 2, table=schema))
    model = TableModel(schema, net, "pt2")
    frame = _frame(12, seed=4).drop(columns="label")
    out = probabilities(model, schema.encode(frame))  # encoded rows, as the loop and re-distillation hold them
    assert out.shape == (12, 2) and np.allclose(out, model.predict_proba(frame), atol=1e-6)
