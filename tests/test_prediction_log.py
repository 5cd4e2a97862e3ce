"""The prediction log against a real SQLite file and a real PostgreSQL (`tests/postgres.py`):
group commit, isolation of a refused write, feedback all-or-nothing, and the window reads the
monitors use."""

from __future__ import annotations

import concurrent.futures
import sqlite3

import numpy as np
import pytest

from kd_ops.log_writer import Committer
from kd_ops.prediction_log import (
    LogError,
    PredictionLog,
    UnknownPredictions,
    open_store,
    prediction_batch,
    prediction_rows,
    predictions,
    read_predictions,
    shadow,
    utcnow,
)


@pytest.fixture
def plog(store_url):
    log = PredictionLog.open_sync(store_url)
    yield log
    log.close()


@pytest.fixture
def sqlite_log(tmp_path):
    log = PredictionLog.open_sync(f"sqlite:///{tmp_path}/sub/p.db")
    yield log
    log.close()


def _batch(n: int, version: str = "1", name: str = "m", seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8), dtype=np.float32)
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    return prediction_rows(prediction_batch(name, version, x, probs, [{"ink": "low"}] * n))


def test_store_is_sqlite_in_wal_mode_with_full_sync(sqlite_log, tmp_path):
    sqlite_log.write(predictions, _batch(1))
    with sqlite3.connect(tmp_path / "sub" / "p.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with sqlite_log.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_concurrent_writes_are_group_committed_and_all_stored(plog):
    jobs = [plog.submit(predictions, _batch(1, seed=i)) for i in range(2000)]
    concurrent.futures.wait(jobs, timeout=120)
    assert all(f.exception() is None for f in jobs)
    assert plog.count() == 2000 == plog.rows_written
    assert plog.commits < 2000  # writes that arrived during a commit shared the next one


def test_replicas_opening_a_new_store_at_once_all_succeed(store_url):
    """Serving replicas start together on an empty store: creating the tables must not race."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        engines = list(pool.map(lambda _: open_store(store_url), range(8)))
    for engine in engines:
        engine.dispose()
    assert read_predictions(store_url).empty


def test_a_refused_write_fails_alone_and_stores_nothing_of_its_own(store_url):
    url = store_url
    PredictionLog.open_sync(url).close()  # the tables
    committer = Committer(url)
    orphan = {"prediction_id": "nope", "teacher_uri": "t", "probabilities": [1.0], "predicted_class": 0}
    # One batch: the foreign key refuses the shadow row; the predictions beside it still commit.
    outcome = committer.commit(
        [(1, "kd_ops_predictions", _batch(3)), (2, "kd_ops_shadow", [{**orphan, "created_at": utcnow()}])]
    )
    committer.close()
    assert outcome == {1: None, 2: "prediction log write failed"}
    assert len(read_predictions(url)) == 3


def test_a_refused_write_is_a_log_error_and_the_log_goes_on(plog):
    orphan = {"prediction_id": "nope", "teacher_uri": "t", "probabilities": [1.0], "predicted_class": 0}
    with pytest.raises(LogError, match="prediction log write failed"):
        plog.write(shadow, [{**orphan, "created_at": utcnow()}])
    plog.write(predictions, _batch(2))
    assert plog.count() == 2 and plog.count(shadow) == 0 and plog.failures == 1


def test_a_writer_that_dies_fails_writes_instead_of_hanging(plog):
    plog.write(predictions, _batch(1))
    plog._proc.kill()
    plog._proc.wait()
    with pytest.raises(LogError):
        plog.write(predictions, _batch(1), timeout=30)
    assert not plog.alive and plog.count() == 1


def test_feedback_is_all_or_nothing_and_the_latest_label_counts(plog):
    rows = _batch(3)
    plog.write(predictions, rows)
    with pytest.raises(UnknownPredictions, match=r"labels\[1\].prediction_id='missing'"):
        plog.add_feedback([(rows[0]["id"], 2), ("missing", 1)])
    frame = read_predictions(plog.url)
    assert frame["label"].isna().all()
    plog.add_feedback([(rows[0]["id"], 2), (rows[1]["id"], 0)])
    plog.add_feedback([(rows[0]["id"], 1)])  # a correction
    frame = read_predictions(plog.url)
    assert frame["label"].tolist()[:2] == [1.0, 0.0] and np.isnan(frame["label"].iloc[2])


def test_window_reads_filter_by_model_time_and_count(plog):
    plog.write(predictions, _batch(4, name="a"))
    cut = utcnow()
    plog.write(predictions, _batch(2, name="b", version="7"))
    plog.write(predictions, _batch(3, name="a", version="2"))
    everything = read_predictions(plog.url)
    assert len(everything) == 9 and everything["model_name"].tolist() == ["a"] * 4 + ["b"] * 2 + ["a"] * 3
    assert read_predictions(plog.url, model_name="a")["model_version"].tolist() == ["1"] * 4 + ["2"] * 3
    assert len(read_predictions(plog.url, since=cut)) == 5
    last = read_predictions(plog.url, model_name="a", last=2)
    assert last["model_version"].tolist() == ["2", "2"] and last["row_index"].tolist() == [1, 2]
    assert read_predictions(plog.url, model_name="nobody").empty


def test_close_commits_what_is_queued(tmp_path):
    log = PredictionLog.open_sync(f"sqlite:///{tmp_path}/p.db")
    futures = [log.submit(predictions, _batch(2, seed=i)) for i in range(50)]
    log.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(read_predictions(f"sqlite:///{tmp_path}/p.db")) == 100
    with pytest.raises(LogError, match="closed"):
        log.write(predictions, _batch(1))


def test_a_bad_store_url_is_named(tmp_path):
    with pytest.raises(ValueError, match="not a SQLAlchemy database URL: 'predictions.db'"):
        open_store("predictions.db")
    with pytest.raises(ValueError, match="in-memory SQLite"):
        open_store("sqlite://")
    with pytest.raises(ValueError, match="no prediction log at"):  # a typo must not read as an empty log
        read_predictions(f"sqlite:///{tmp_path}/typo.db")
    assert not (tmp_path / "typo.db").exists()


def test_times_are_stored_as_sqlalchemy_writes_them(tmp_path):
    """A row written at a whole second must be found by a window starting at that second."""
    import datetime as dt

    url = f"sqlite:///{tmp_path}/p.db"
    committer = Committer(url)
    rows = _batch(1)
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5)  # no microseconds
    committer.commit([(1, "kd_ops_predictions", [{**rows[0], "created_at": t0.isoformat()}])])
    committer.close()
    frame = read_predictions(url, since=t0)
    assert len(frame) == 1 and frame["created_at"].iloc[0] == t0
