"""The prediction log against a real SQLite file and a real PostgreSQL (`tests/postgres.py`):
group commit, isolation of a refused write, feedback all-or-nothing, and the window reads the
monitors use."""

from __future__ import annotations

import concurrent.futures
import sqlite3

import numpy as np
import pandas as pd
import pytest

from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.protocol import prediction_batch, prediction_rows
from kd_ops.prediction_log.reader import read_predictions
from kd_ops.prediction_log.store import LogError, UnknownPredictions, open_store, predictions, shadow, utcnow
from kd_ops.prediction_log.writer import Committer

from .stored import stored_columns


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


# -- window reads: cost and correctness ---------------------------------------------------------
def _logged(url: str, seed: int = 0) -> dict:
    """A log written through the writer (`Committer`) with what a window read must get right: two
    versions, another model interleaved, requests sharing a timestamp (ties broken by request id,
    then row index), several labels per prediction (the latest counts), shadow rows (the latest
    counts). Returns what was written, for a brute-force reading."""
    import datetime as dt

    rng = np.random.default_rng(seed)
    t0 = dt.datetime(2026, 3, 1, 12, 0, 0)
    written, jobs = [], []
    for r in range(14):
        name = "b" if r % 3 == 2 else "a"
        rows = _batch(int(rng.integers(2, 5)), version="1" if r < 7 else "2", name=name, seed=seed * 100 + r)
        stamp = t0 + dt.timedelta(seconds=r // 2)  # two requests per timestamp
        rows = [{**row, "created_at": stamp} for row in rows]
        written += rows
        jobs.append((r, "kd_ops_predictions", rows))
    committer = Committer(url)
    assert set(committer.commit(jobs).values()) == {None}
    labels: dict[str, int] = {}
    scores: dict[str, dict] = {}
    for round_ in range(3):  # later rounds: corrections, each a commit of its own (higher ids)
        fb, sh = [], []
        for row in written:
            if rng.random() < 0.5:
                labels[row["id"]] = int(rng.integers(3))
                fb.append({"prediction_id": row["id"], "label": labels[row["id"]], "received_at": utcnow()})
            if rng.random() < 0.3:
                probs = rng.dirichlet(np.ones(3)).astype(np.float32)
                scores[row["id"]] = {"uri": f"models:/t/{round_}", "probs": probs, "cls": int(probs.argmax())}
                sh.append(
                    {
                        "prediction_id": row["id"],
                        "teacher_uri": f"models:/t/{round_}",
                        "probabilities": probs,
                        "predicted_class": int(probs.argmax()),
                        "created_at": utcnow(),
                    }
                )
        assert set(committer.commit([(1, "kd_ops_feedback", fb), (2, "kd_ops_shadow", sh)]).values()) == {None}
    committer.close()
    return {"rows": written, "labels": labels, "scores": scores, "t0": t0}


def _brute_force(log: dict, model_name=None, since=None, last=None, ids=None) -> list[dict]:
    rows = [
        r
        for r in log["rows"]
        if (model_name is None or r["model_name"] == model_name)
        and (since is None or r["created_at"] >= since)
        and (ids is None or r["id"] in ids)
    ]
    rows.sort(key=lambda r: r["row_index"], reverse=True)
    rows.sort(key=lambda r: r["request_id"])
    rows.sort(key=lambda r: r["created_at"], reverse=True)
    return rows[:last][::-1] if last is not None else rows[::-1]


def test_window_reads_match_a_brute_force_reading(store_url, monkeypatch):
    import datetime as dt

    import kd_ops.prediction_log.reader

    log = _logged(store_url)
    some = {r["id"] for r in log["rows"][::3]}
    cases = [{}, {"model_name": "a"}, {"model_name": "b", "last": 3}, {"last": 4}]
    cases += [{"model_name": "a", "last": n} for n in (1, 2, 5, 6, 11, 10_000)]
    cases += [{"model_name": "a", "since": log["t0"] + dt.timedelta(seconds=3), "last": n} for n in (3, 1000)]
    cases += [{"model_name": "a", "ids": sorted(some), "last": 4}, {"ids": sorted(some)}]
    cases += [{"model_name": "a", "last": 0}, {"model_name": "a", "since": log["t0"] + dt.timedelta(seconds=99)}]
    # and again with chunks of 3 ids: windows, labels and shadow rows read in several statements
    cases += [{**case, "chunk": 3} for case in cases if "ids" in case or case.get("last") == 11]
    for case in cases:
        monkeypatch.setattr(kd_ops.prediction_log.reader, "_WINDOW_CHUNK", case.pop("chunk", 500))
        expected = _brute_force(log, **case)
        frame = read_predictions(store_url, **case)
        assert (frame["id"].tolist() if len(frame) else []) == [r["id"] for r in expected], case
        for got, want in zip(frame.to_dict("records"), expected):
            assert got["created_at"] == want["created_at"] and got["model_version"] == want["model_version"]
            np.testing.assert_array_equal(np.asarray(got["inputs"], np.float32), want["inputs"])
            np.testing.assert_array_equal(np.asarray(got["probabilities"], np.float32), want["probabilities"])
            assert got["slice_ink"] == "low"
            label = log["labels"].get(want["id"])
            assert (pd.isna(got["label"]) if label is None else got["label"] == label), case
            score = log["scores"].get(want["id"])
            if score is None:
                assert got["teacher_uri"] is None and pd.isna(got["teacher_class"])
            else:
                assert got["teacher_uri"] == score["uri"] and got["teacher_class"] == score["cls"]
                np.testing.assert_array_equal(np.asarray(got["teacher_probabilities"], np.float32), score["probs"])
    # the window is smaller than the log, and its boundary cuts through requests sharing a timestamp
    assert len(read_predictions(store_url, model_name="a", last=5)) < len(read_predictions(store_url))


def test_a_window_read_touches_only_the_window(tmp_path):
    """Every statement of a window read goes through an index (`SEARCH`): none scans a table of the
    log or sorts it, whatever the log's size."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/p.db"
    log = _logged(url)
    statements = []

    def grab(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001 - SQLAlchemy's hook
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", grab)
    try:
        read_predictions(url, model_name="a", last=5)
        read_predictions(url, model_name="a", since=log["t0"])
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", grab)
    plans = []
    with sqlite3.connect(tmp_path / "p.db") as conn:
        for statement, parameters in statements:
            if "kd_ops_" in statement:
                plans.append([row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, parameters)])
    steps = [step for plan in plans for step in plan]
    for table in ("kd_ops_predictions", "kd_ops_feedback", "kd_ops_shadow"):
        assert any(s.startswith(f"SEARCH {table} USING ") for s in steps), (table, plans)
    assert not [s for s in steps if s.startswith("SCAN kd_ops_") or "TEMP B-TREE" in s], plans


def _insert_raw(url: str, table: str, values: dict) -> None:
    """One row written with plain SQL, past the writer's encoding."""
    import sqlalchemy as sa

    engine = open_store(url)
    cols = ", ".join(values)
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + k for k in values)})"), values)
    engine.dispose()


def _raw_prediction(pid: str, **values) -> dict:
    row = {
        "id": pid,
        "created_at": "2027-01-01 00:00:00.000000",  # the newest row: in every window
        "model_name": "m",
        "model_version": "1",
        "request_id": "r" * 32,
        "row_index": 0,
        "inputs": "[" + ", ".join(["0.5"] * 8) + "]",
        "probabilities": "[0.2, 0.3, 0.5]",
        "predicted_class": 2,
        "confidence": 0.5,
        "slices": '{"ink": "low"}',
    }
    return {**row, **values}


@pytest.mark.parametrize(
    "column, text, why",
    [
        ("probabilities", "[0.2, 1e999, 0.5]", "not valid JSON \\(number is infinity"),  # PostgreSQL's json takes it
        ("inputs", "[0.5, null, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]", "holds null where a number belongs"),  # orjson's NaN
        ("probabilities", "[NaN, 0.3, 0.5]", "not valid JSON \\(unexpected character"),  # by hand, in SQLite
        ("slices", '{"ink": 1e999}', "not valid JSON"),
    ],
)
def test_an_undecodable_stored_value_names_table_column_and_row(store_url, column, text, why):
    from monitors.window import WindowError, load_window

    if "NaN" in text and store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's json type refuses NaN: no such row can be stored there")
    PredictionLog.open_sync(store_url).close()  # the tables
    good = _batch(3)
    committer = Committer(store_url)
    committer.commit([(1, "kd_ops_predictions", good)])
    committer.close()
    _insert_raw(store_url, "kd_ops_predictions", _raw_prediction("bad0" * 8, **{column: text}))
    with pytest.raises(ValueError, match=f"table kd_ops_predictions, column {column}, row id='{'bad0' * 8}': {why}"):
        read_predictions(store_url, model_name="m", last=10)
    with pytest.raises(WindowError, match=f"^monitor.store: table kd_ops_predictions, column {column}, row id="):
        load_window(store_url, "m", 8, 3, rows=10)
    assert len(read_predictions(store_url, ids=[r["id"] for r in good])) == 3  # a read without it is unharmed


def test_an_undecodable_shadow_score_names_its_row(store_url):
    PredictionLog.open_sync(store_url).close()
    _insert_raw(store_url, "kd_ops_predictions", _raw_prediction("good" * 8))
    shadow_row = {"prediction_id": "good" * 8, "teacher_uri": "t", "predicted_class": 0}
    _insert_raw(store_url, "kd_ops_shadow", {**shadow_row, "probabilities": "[1e999]", "created_at": utcnow()})
    with pytest.raises(ValueError, match=r"table kd_ops_shadow, column probabilities, row id=1 \(prediction_id='good"):
        read_predictions(store_url)


# -- the write path: predictions in their stored form (kd_ops.prediction_log.stored_predictions) --
def _odd_batch(ids: list[str], seed: int = 3) -> dict:
    """Rows that exercise the stored form: float64 inputs (stored as float32), values float32
    rounds, a whole-second timestamp, slices with quotes and non-ASCII text, a tie in the scores."""
    import datetime as dt

    rng = np.random.default_rng(seed)
    n = len(ids)
    x = rng.normal(size=(n, 5)) * 1e3
    x[0, :3] = [0.1, -0.0, 1e-39]
    probs = rng.dirichlet(np.ones(4), n)  # float64, as some callers send
    probs[0] = [0.25, 0.25, 0.25, 0.25]
    slices = [{"site": 'Kö"ln\\', "ink": "low"}] + [{} for _ in range(n - 1)]
    batch = prediction_batch("m", "v1", x, probs, slices, ids)
    batch["created_at"] = dt.datetime(2026, 1, 2, 3, 4, 5)
    return batch


def test_the_stored_form_is_what_sqlalchemy_stores_and_reads_back_the_same(store_url):
    """The server's fast path (stored form, one executemany / multi-row INSERT) and SQLAlchemy's
    own bind processors (rows as dicts) leave the same text in every column, on SQLite and
    PostgreSQL, and read back as the same frame."""
    log = PredictionLog.open_sync(store_url)
    try:
        via_dicts = _odd_batch([f"a{i:031d}" for i in range(5)])
        via_stored = {**via_dicts, "ids": [f"b{i:031d}" for i in range(5)]}
        log.write(predictions, prediction_rows(via_dicts))  # each value through its column's bind processor
        log.write(predictions, via_stored)  # the stored form
    finally:
        log.close()
    a = stored_columns(store_url, via_dicts["ids"])
    b = stored_columns(store_url, via_stored["ids"])
    assert len(a) == len(b) == 5
    assert [a[i] for i in via_dicts["ids"]] == [b[i] for i in via_stored["ids"]]
    frame = read_predictions(store_url).sort_values("id").reset_index(drop=True)  # a... rows, then b...
    one, other = frame.iloc[:5].drop(columns="id"), frame.iloc[5:].drop(columns="id")
    pd.testing.assert_frame_equal(one.reset_index(drop=True), other.reset_index(drop=True))
    assert frame["slice_site"].iloc[0] == 'Kö"ln\\' and frame["predicted_class"].iloc[0] == 0
    stored_inputs = np.stack(frame["inputs"].iloc[:5]).astype(np.float32)  # shortest float32 text, read as doubles
    np.testing.assert_array_equal(stored_inputs, via_dicts["inputs"].astype(np.float32))


def test_a_refused_stored_job_fails_alone(store_url):
    from kd_ops.prediction_log.protocol import stored_predictions
    from kd_ops.prediction_log.writer import Stored

    PredictionLog.open_sync(store_url).close()  # the tables
    committer = Committer(store_url)
    try:
        first = stored_predictions(_odd_batch(["x" * 32, "y" * 32]))
        assert committer.commit([(1, "kd_ops_predictions", Stored(2, first))]) == {1: None}
        again = stored_predictions(_odd_batch(["z" * 32, "x" * 32]))  # "x"*32 is stored already
        good = stored_predictions(_odd_batch(["w" * 32]))
        short = [stored_predictions(_odd_batch(["v" * 32]))[0][:-1]]  # a value missing
        outcome = committer.commit(
            [
                (2, "kd_ops_predictions", Stored(2, again)),
                (3, "kd_ops_predictions", Stored(1, good)),
                (4, "kd_ops_predictions", Stored(1, short)),
            ]
        )
    finally:
        committer.close()
    assert outcome == {2: "prediction log write failed", 3: None, 4: "prediction log write failed"}
    assert sorted(read_predictions(store_url)["id"]) == ["w" * 32, "x" * 32, "y" * 32]  # nothing of job 2 or 4


def test_every_acknowledged_write_is_stored_when_the_writer_is_killed(store_url):
    """SIGKILL the writer while writes stream in: each write that resolved is in the store
    (the acknowledgement follows the commit); the others fail with LogError, none hangs."""
    import signal
    import threading
    import time

    log = PredictionLog.open_sync(store_url)
    acked: list[str] = []
    refused = 0
    stop = threading.Event()

    def client(k: int) -> None:
        nonlocal refused
        rng = np.random.default_rng(k)
        i = 0
        while not stop.is_set():
            ids = [f"{k:02d}{i:06d}{j:024d}" for j in range(3)]
            batch = prediction_batch("m", "1", rng.random((3, 8)), rng.dirichlet(np.ones(3), 3), [{}] * 3, ids)
            try:
                log.write(predictions, batch, timeout=60)
            except LogError:
                refused += 1
                return
            acked.extend(ids)
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 600 and time.monotonic() < deadline:
            time.sleep(0.01)
        log._proc.send_signal(signal.SIGKILL)  # mid-stream: writes are in flight
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop.set()
        log.close()
    assert len(acked) >= 600 and refused >= 1
    stored = set(read_predictions(store_url)["id"])
    assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged rows missing"
