"""Re-distillation after drift, without new labels: the teacher labels recent production inputs.

The deployed student has drifted away from its traffic; the teacher (bigger, more robust) still
reads that traffic well. So the transfer set becomes the training data plus the latest
`redistill.production_rows` inputs from the prediction log, each labelled by the teacher of the
champion's lineage (a feedback label wins where one arrived). A new student is distilled on it
and must earn the champion alias on two counts besides the config's own gates:

  recent     on a holdout of those production rows that no model trained on, the new student's
             accuracy minus the champion's is at least `min_recent_gain` (labels: feedback where
             it exists, the teacher's otherwise, so this is agreement with the teacher there)
  reference  on the reference stored with the champion (validation rows with true labels), the
             new student loses at most `max_reference_drop` against the champion: adapting to
             the new traffic must not forget the old

Every decision is recorded with the version's gates (`gates.json`, `kd_ops.gate.*` tags), so the
registry says why a re-distilled student was or was not promoted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kd_ops.config.experiment import ExperimentConfig
from kd_ops.core.errors import ConfigError

log = logging.getLogger(__name__)
TAG_REDISTILL = "kd_ops.redistill.champion"  # on a re-distilled version: the champion it was made to replace
TAG_TRIGGER = "kd_ops.redistill.trigger"
TAG_KEY = "kd_ops.redistill.key"  # what makes a retried re-distillation find the candidate it registered


class NoProductionRows(ConfigError):
    """The prediction log holds nothing for this model: there is no new traffic to distil on."""


@dataclass
class ProductionSet:
    """Recent production inputs and the labels the new student learns and is gated on."""

    x: np.ndarray
    y: np.ndarray  # feedback label where one arrived, else the teacher's class
    from_feedback: np.ndarray  # bool per row
    holdout: np.ndarray  # bool per row: kept out of training, used to gate
    times: tuple[str, str] | None = None  # first and last prediction of the window (UTC, ISO)
    versions: tuple[str, ...] = ()  # the model versions that answered these rows

    def counts(self) -> dict[str, int]:
        return {
            "production_rows": int(len(self.y)),
            "feedback_labels": int(self.from_feedback.sum()),
            "teacher_labels": int((~self.from_feedback).sum()),
            "holdout_rows": int(self.holdout.sum()),
        }


@dataclass
class RedistillResult:
    model_name: str
    champion_before: str
    candidate_version: str | None
    promoted: bool
    reason: str
    champion_after: str | None = None
    rows: dict[str, int] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # {"recent"|"reference": {model: acc}}
    gates: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def teacher_uri_of(client: Any, name: str, version: str) -> str:
    """The teacher in a version's lineage (comma-separated for an ensemble)."""
    from kd_ops.registry.tracking import TAG_TEACHER_URI

    uri = client.get_model_version(name, version).tags.get(TAG_TEACHER_URI)
    if not uri:
        raise ConfigError(
            f"{name} v{version} has no {TAG_TEACHER_URI} tag: its teacher is unknown, nothing can relabel"
        )
    return uri


def predict_classes(model: Any, x: np.ndarray) -> np.ndarray:
    from kd_ops.evaluation.reference import probabilities

    return probabilities(model, np.asarray(x, dtype=np.float32)).argmax(axis=1)


def teacher_classes(teachers: list[Any], x: np.ndarray) -> np.ndarray:
    """The teacher's class per row; the members of an ensemble vote with their averaged probabilities."""
    from kd_ops.evaluation.reference import probabilities

    x = np.asarray(x, dtype=np.float32)
    return np.mean([probabilities(t, x) for t in teachers], axis=0).argmax(axis=1)


MIN_HOLDOUT_ROWS = 20  # fewer recent rows to gate on and the recent-gain gate is a coin toss


def logged_rows(inputs: Any, n_features: int, name: str, schema: Any = None) -> np.ndarray:
    """The log's `inputs` column as the rows a model reads: float rows as they are (images, and
    the encoded rows older servers logged for tables), a table's raw records encoded with
    `schema` (`strict=False`: a field the model does not take was ignored when it was served, a
    category never seen in training is a missing value, as the served model read it)."""
    values = list(inputs)
    records = [isinstance(v, dict) for v in values]
    if any(records) and schema is None:
        raise ConfigError(f"the prediction log holds table records for {name!r} but its data has no table schema")
    if schema is None or not any(records):
        x = np.asarray(values, dtype=np.float32)
    else:
        import pandas as pd

        x = np.empty((len(values), schema.width), dtype=np.float32)
        rows = np.asarray(records)
        table = pd.DataFrame.from_records([v for v, r in zip(values, records) if r])
        x[rows] = schema.encode(table, where=f"logged inputs of {name!r}", strict=False)
        if not rows.all():
            x[~rows] = np.asarray([v for v, r in zip(values, records) if not r], dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ConfigError(f"logged inputs of {name!r} have shape {x.shape}; the dataset has {n_features} features")
    return x


def production_set(
    cfg: ExperimentConfig, teachers: list[Any], n_features: int, n_classes: int, schema: Any = None
) -> ProductionSet:
    """The latest `production_rows` inputs of the model from the log, labelled, with a holdout.
    `schema`: the table schema the rows are encoded with (None for images)."""
    from kd_ops.prediction_log.reader import read_predictions

    name, r = cfg.registry.name, cfg.redistill
    try:
        frame = read_predictions(cfg.monitor.store, name, last=r.production_rows)
    except Exception as exc:
        from kd_ops.core.errors import first_line

        raise ConfigError(f"monitor.store = {cfg.monitor.store!r}: cannot read the prediction log: {first_line(exc)}")
    if frame.empty:
        raise NoProductionRows(f"the prediction log {cfg.monitor.store} holds no predictions of {name!r}")
    try:
        x = logged_rows(frame["inputs"], n_features, name, schema)
    except ValueError as exc:  # rows of different lengths, text where numbers belong
        raise ConfigError(f"logged inputs of {name!r}: {exc}") from None
    feedback = frame["label"].to_numpy(dtype=float)
    # A feedback label that is not one of the model's classes is not trusted: the teacher labels that row.
    from_feedback = np.isfinite(feedback) & (feedback >= 0) & (feedback < n_classes)
    y = np.where(from_feedback, np.nan_to_num(feedback), teacher_classes(teachers, x)).astype(np.int64)
    n_holdout = int(round(r.holdout_fraction * len(y)))
    if n_holdout < MIN_HOLDOUT_ROWS:
        raise NoProductionRows(
            f"{len(y)} logged predictions of {name!r} leave {n_holdout} rows to gate on (at least {MIN_HOLDOUT_ROWS}):"
            " raise redistill.production_rows or holdout_fraction, or wait for more traffic"
        )
    holdout = np.zeros(len(y), dtype=bool)
    holdout[np.random.default_rng(cfg.seed).permutation(len(y))[:n_holdout]] = True
    times = None
    if "created_at" in frame:
        stamps = frame["created_at"]
        times = (stamps.min().isoformat(timespec="seconds"), stamps.max().isoformat(timespec="seconds"))
    versions = tuple(sorted({str(v) for v in frame.get("model_version", [])}, key=_version_order))
    return ProductionSet(x, y, from_feedback, holdout, times, versions)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (10**9, version)


def window_input(cfg: ExperimentConfig, prod: ProductionSet, dm: Any, champion: str) -> Any:
    """The production window as an MLflow dataset input of the new student's run: the rows it
    learned from (and was gated on), where they came from and how they were labelled."""
    from kd_ops.registry.datasets import production_window, rows_schema
    from kd_ops.serving.state import masked

    counts = prod.counts()
    n = max(counts["production_rows"], 1)
    tags = {
        "model_version": ",".join(prod.versions),
        "champion": champion,
        "feedback_labels": counts["feedback_labels"],
        "teacher_labels": counts["teacher_labels"],
        "feedback_share": f"{counts['feedback_labels'] / n:.3f}",
        "teacher_share": f"{counts['teacher_labels'] / n:.3f}",
        "holdout_rows": counts["holdout_rows"],
    }
    if prod.times is not None:
        tags.update(window_start=prod.times[0], window_end=prod.times[1])
    store = cfg.monitor.store
    return production_window(
        prod.x,
        prod.y,
        model_name=cfg.registry.name,
        store=masked(store) if "://" in store else store,  # a database password never reaches MLflow
        schema=rows_schema(dm),
        classes=list(dm.class_names()),
        tags=tags,
    )


def table_schema(dm: Any, champion_model: Any, name: str, champion: str) -> Any:
    """The schema the logged records are encoded with: the champion's, which served them. The
    rows join the data's transfer set, so it must be the schema the data was encoded with too:
    the same columns of the same kinds and the same vocabularies, or a category index would mean
    another category to the new student. None for images."""
    schema = dm.schema
    if schema is None:
        return None
    # A table model of another encoding is wrapped (its own schema on `.estimator`); one of this
    # encoding is read directly and carries its schema itself (kd_ops.models.loading.for_table).
    served = getattr(getattr(champion_model, "estimator", None), "schema", None)
    served = served if served is not None else getattr(champion_model, "schema", None)
    if served is None:  # a champion that is not a kd-ops table model: the data's own encoding
        return schema

    if not served.same_encoding(schema):
        theirs = {c.name: c.kind for c in served.columns}
        ours = {c.name: c.kind for c in schema.columns}
        if list(theirs) != list(ours):
            what = f"columns {list(theirs)[:8]} against {list(ours)[:8]}"
        elif theirs != ours:
            what = "the same columns of other kinds"
        elif served.classes != schema.classes:
            what = f"classes {list(served.classes)[:8]} against {list(schema.classes)[:8]}"
        elif [(c.tokenizer, c.max_length) for c in served.columns] != [
            (c.tokenizer, c.max_length) for c in schema.columns
        ]:
            what = "other text tokenizers"
        else:
            what = "other category vocabularies"
        raise ConfigError(
            f"{name} v{champion} was distilled on another table than data {dm.cfg.source_name!r} ({what}): "
            "re-distil with the data the champion was distilled on"
        )
    return served


def redistill_config(cfg: ExperimentConfig, teacher_uri: str) -> ExperimentConfig:
    """The recipe of `cfg`, with the champion's teacher loaded instead of trained, no baseline and
    no promotion inside the distillation: the decision is taken here, against the champion."""
    uris = teacher_uri.split(",")
    if len(uris) != 1 + len(cfg.teachers):
        raise ConfigError(
            f"the champion's lineage names {len(uris)} teacher(s) but the config has {1 + len(cfg.teachers)}"
            " (teacher + teachers): re-distil with the config the champion was distilled with"
        )
    teachers = [t.model_copy(update={"uri": u}) for t, u in zip(cfg.teachers, uris[1:])]
    return cfg.model_copy(
        update={
            "teacher": cfg.teacher.model_copy(update={"uri": uris[0]}),
            "teachers": teachers,
            "distill": cfg.distill.model_copy(update={"baseline": False}),
            "registry": cfg.registry.model_copy(update={"promote": False}),
        }
    )


@dataclass
class Candidate:
    """A re-distilled student registered to replace `champion`, not yet judged against it. Its
    stored reference is the held-out recent traffic (the rows the decision gates on)."""

    model_name: str
    version: str
    champion: str
    key: str
    run_id: str  # the distillation's parent run
    student_run_id: str
    teacher_uri: str
    reused: bool = False  # found under its key: an earlier attempt trained it
    rows: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def new_key() -> str:
    """A key of its own for a re-distillation nobody will retry under the same key (one CLI call)."""
    import uuid

    return uuid.uuid4().hex


def find_candidate(client: Any, name: str, key: str) -> Candidate | None:
    """The version registered under `key` by an earlier attempt, if any (the oldest, should a race
    have made two)."""
    from kd_ops.registry.tracking import TAG_TEACHER_URI

    found = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(TAG_KEY) == key]
    if not found:
        return None
    mv = min(found, key=lambda v: int(v.version) if str(v.version).isdigit() else 0)
    run = client.get_run(mv.run_id)
    rows = {k.removeprefix("redistill."): int(v) for k, v in run.data.params.items() if k.startswith("redistill.")}
    return Candidate(
        name,
        str(mv.version),
        mv.tags.get(TAG_REDISTILL, ""),
        key,
        run.data.tags.get("mlflow.parentRunId", mv.run_id),
        mv.run_id,
        mv.tags.get(TAG_TEACHER_URI, ""),
        reused=True,
        rows=rows,
    )


def train_candidate(cfg: ExperimentConfig, trigger: str = "manual", key: str | None = None) -> Candidate:
    """Distil a new student on the training data + labelled recent production rows and register
    it as a candidate (gates `pending`). Idempotent under `key` (the Prefect flows pass the
    triggering event's id, else the flow run's): a version already registered under it is
    returned as it is, so a retry after registration trains nothing twice."""
    from kd_ops.core.env import apply_offline_defaults
    from kd_ops.data.datamodule import DistillDataModule, ExtraRows
    from kd_ops.models.loading import load_for_data
    from kd_ops.pipeline.distillation import run_distillation
    from kd_ops.registry import gates, promotion
    from kd_ops.registry.tracking import open_tracking
    from kd_ops.serving.served_model import resolve_alias

    apply_offline_defaults()
    key = key or new_key()
    name = cfg.registry.name
    client = open_tracking(cfg.tracking.uri)  # the lineage teachers' models:/ URIs resolve there too
    found = find_candidate(client, name, key)
    if found is not None:
        log.info(
            "re-distillation %s of %s: v%s was registered under it already, not trained again", key, name, found.version
        )
        return found
    if cfg.redistill.teacher == "refit":
        from kd_ops.pipeline.refit import check_refit

        check_refit(cfg)  # before anything is loaded or trained
    champion = resolve_alias(client, name, promotion.CHAMPION)
    teacher_uri = teacher_uri_of(client, name, champion)
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    # cfg.allow_pickle (--allow-pickle): consent to load lineage models whose files run code.
    teachers = [
        load_for_data(u, dm, f"the teacher of {name} v{champion}", allow_pickle=cfg.allow_pickle)
        for u in teacher_uri.split(",")
    ]
    champion_model = load_for_data(f"models:/{name}/{champion}", dm, "champion", allow_pickle=cfg.allow_pickle)
    prod = production_set(cfg, teachers, dm.n_features, dm.n_classes, table_schema(dm, champion_model, name, champion))
    train = ~prod.holdout
    tags = {TAG_REDISTILL: champion, TAG_TRIGGER: trigger[:250], TAG_KEY: key}
    if cfg.redistill.teacher == "refit":
        from kd_ops.pipeline.refit import refit_teachers

        # Fitted on the labelled rows it may learn from (never the holdout), then it relabels the rest.
        known = train & prod.from_feedback
        teachers, teacher_uri = refit_teachers(
            cfg, dm, prod.x[known], prod.y[known], previous_uri=teacher_uri, tags=tags
        )
        prod.y = np.where(prod.from_feedback, prod.y, teacher_classes(teachers, prod.x)).astype(np.int64)
    recipe = redistill_config(cfg, teacher_uri)
    hx, hy = prod.x[prod.holdout], prod.y[prod.holdout]
    counts = prod.counts()
    log.info(
        "re-distilling %s (champion v%s): %d production rows%s%s, %d feedback-labelled, %d teacher-labelled%s;"
        " %d join the transfer set, %d held out to gate",
        name,
        champion,
        counts["production_rows"],
        f" answered by v{', v'.join(prod.versions)}" if prod.versions else "",
        f" from {prod.times[0]} to {prod.times[1]}" if prod.times else "",
        counts["feedback_labels"],
        counts["teacher_labels"],
        " (by the refitted teacher)" if cfg.redistill.teacher == "refit" else "",
        int(train.sum()),
        counts["holdout_rows"],
    )
    # The new version's reference is the held-out recent traffic it was made for.
    result = run_distillation(
        recipe,
        extra=ExtraRows(prod.x[train], prod.y[train]),
        tags=tags,
        reference=ExtraRows(hx, hy, known=prod.from_feedback[prod.holdout]),
        extra_inputs=[window_input(cfg, prod, dm, champion)],
    )
    version = result.registered["version"]
    # The config's gates may have marked it passed; without the champion gates it is not yet.
    client.set_model_version_tag(name, version, gates.TAG_GATES, "pending")
    from mlflow.entities import Param

    client.log_batch(result.runs["student"], params=[Param(f"redistill.{k}", str(v)) for k, v in counts.items()])
    client.log_dict(result.runs["parent"], {"trigger": trigger, "key": key, **counts}, "redistill.json")
    return Candidate(
        name, version, champion, key, result.runs["parent"], result.runs["student"], teacher_uri, rows=counts
    )


def decide(cfg: ExperimentConfig, candidate: Candidate) -> RedistillResult:
    """Judge a registered candidate against the champion it was made to replace, record the
    gates, promote it when all pass. Everything is read back from the registry (the candidate,
    its held-out recent rows, the config's gates as the distillation recorded them, the
    champion and its reference), so a retry repeats the decision, never the training; a
    candidate already promoted stays promoted."""
    import json

    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.evaluation.reference import load_reference
    from kd_ops.models.loading import load_for_data
    from kd_ops.registry import gates, promotion
    from kd_ops.registry.gates import GateDecision
    from kd_ops.registry.tracking import open_tracking
    from kd_ops.serving.served_model import resolve_alias

    name, r = cfg.registry.name, cfg.redistill
    version, champion = candidate.version, candidate.champion
    client = open_tracking(cfg.tracking.uri)
    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()

    def load(uri: str, what: str) -> Any:
        return load_for_data(uri, dm, what, allow_pickle=cfg.allow_pickle)

    student = load(f"models:/{name}/{version}", f"candidate {name} v{version}")
    champion_model = load(f"models:/{name}/{champion}", f"champion {name} v{champion}")
    teachers = [load(u, f"the teacher of {name} v{version}") for u in candidate.teacher_uri.split(",")]
    recent = load_reference(name, version, cfg.tracking.uri)  # the held-out production rows
    reference = load_reference(name, champion, cfg.tracking.uri)
    hx, hy = recent.x, recent.labels
    with open(client.download_artifacts(candidate.student_run_id, "gates.json")) as f:
        config_gates = json.load(f)["gates"]  # as the distillation recorded them

    def acc(model: Any, x: np.ndarray, y: np.ndarray) -> float:
        return float((predict_classes(model, x) == y).mean())

    accuracy = {
        "recent": {"champion": acc(champion_model, hx, hy), "candidate": acc(student, hx, hy)},
        "reference": {
            "champion": acc(champion_model, reference.x, reference.labels),
            "candidate": acc(student, reference.x, reference.labels),
            "teacher": float((teacher_classes(teachers, reference.x) == reference.labels).mean()),
        },
    }
    gain = accuracy["recent"]["candidate"] - accuracy["recent"]["champion"]
    drop = accuracy["reference"]["champion"] - accuracy["reference"]["candidate"]
    ours = [
        GateDecision(
            "min_recent_gain_vs_champion",
            "recent_gain",
            ">=",
            gain,
            r.min_recent_gain,
            gain >= r.min_recent_gain,
            f"vs champion v{champion}, {len(hy)} recent rows",
        ),
        GateDecision(
            "max_reference_drop_vs_champion",
            "reference_drop",
            "<=",
            drop,
            r.max_reference_drop,
            drop <= r.max_reference_drop,
            f"vs champion v{champion}, {len(reference.labels)} reference rows",
        ),
    ]
    ours_names = {d.gate for d in ours}
    decisions = [GateDecision(**g) for g in config_gates if g["gate"] not in ours_names] + ours
    gates.record(decisions, client, candidate.student_run_id, name, version)
    gates.log_decisions(ours)  # the config's gates were logged by the distillation
    for part, values in accuracy.items():
        for model, value in values.items():
            client.log_metric(candidate.run_id, f"{part}_accuracy_{model}", value)

    failed = [d for d in decisions if not d.passed]
    now = resolve_alias(client, name, promotion.CHAMPION)
    promoted = now == version  # an earlier attempt promoted it and failed after
    if not failed and cfg.registry.promote and now == champion:
        promotion.promote(name, version, uri=cfg.tracking.uri)
        promoted = True
    rec = accuracy["recent"]
    if promoted:
        reason = (
            f"promoted v{version} over v{champion}: recent accuracy"
            f" {rec['champion']:.3f} -> {rec['candidate']:.3f} on {len(hy)} held-out rows,"
            f" reference"
            f" {accuracy['reference']['champion']:.3f} -> {accuracy['reference']['candidate']:.3f}"
        )
    elif failed:
        reason = f"kept v{champion}: " + "; ".join(f"{d.gate} {d.tag_value()}" for d in failed)
    elif now != champion:
        reason = f"kept v{now}: the champion changed from v{champion} while v{version} was distilled"
    else:
        reason = f"kept v{champion}: every gate passed but registry.promote is false"
    log.info("re-distillation of %s: %s", name, reason)
    return RedistillResult(
        name,
        champion,
        version,
        promoted,
        reason,
        promotion.state(name, client).champion,
        candidate.rows,
        accuracy,
        gates.as_json(decisions),
        candidate.run_id,
    )


def run_redistillation(cfg: ExperimentConfig, trigger: str = "manual", key: str | None = None) -> RedistillResult:
    """Distil a new student on training data + labelled production rows (`train_candidate`);
    promote it only if it beats the champion on recent rows and holds on the reference (`decide`)."""
    return decide(cfg, train_candidate(cfg, trigger, key))


def last_redistillation(cfg: ExperimentConfig, key: str | None = None) -> str | None:
    """Why a re-distillation should not start now: the model was re-distilled within
    `redistill.cooldown_minutes` (None: go ahead). Versions carry the time, so this holds across
    processes and restarts. A version registered under `key` is this re-distillation's own
    (a retry): it is no reason to stop."""
    import time

    cooldown = cfg.redistill.cooldown_minutes * 60_000
    if cooldown <= 0:
        return None
    name = cfg.registry.name
    now = time.time() * 1000
    from kd_ops.registry.tracking import open_tracking

    versions = open_tracking(cfg.tracking.uri).search_model_versions(f"name = '{name}'")
    recent = [
        v
        for v in versions
        if TAG_REDISTILL in v.tags
        and now - v.creation_timestamp < cooldown
        and (key is None or v.tags.get(TAG_KEY) != key)
    ]
    if not recent:
        return None
    last = max(recent, key=lambda v: v.creation_timestamp)
    minutes = (now - last.creation_timestamp) / 60_000
    return (
        f"{name} v{last.version} was re-distilled {minutes:.0f} min ago"
        f" (redistill.cooldown_minutes = {cfg.redistill.cooldown_minutes:g})"
    )
