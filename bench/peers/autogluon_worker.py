"""AutoGluon's side of `bench/peer_autogluon.py`: fit, distil and measure on rows kd-ops exported.

Runs in its own venv (bench/.venv-autogluon: AutoGluon pins its own numpy, scikit-learn and
LightGBM, which need not agree with kd-ops'), so it must not import kd_ops. It reads
`<folder>/{train,val,test}.parquet` (raw columns plus the label, exactly the rows of kd-ops' splits)
and `<folder>/meta.json` (the label's name and its positive class), and prints one JSON object.

    bench/.venv-autogluon/bin/python bench/peers/autogluon_worker.py <folder> <seed> <time_limit> [distill_limit]

What it does, and why each choice:
- `TabularPredictor(eval_metric='accuracy').fit(train, tuning_data=val, presets='medium_quality')`:
  the same train and val rows kd-ops' teacher sees (val for early stopping and model selection),
  no bagging (medium_quality), on one CPU (`num_cpus=1`, `ag_args_fit={'num_cpus': 1}`).
- Seeds: AutoGluon has no global seed in `fit`; each model takes its own (`seed` for LightGBM,
  `random_seed` for CatBoost, `seed_value` for its torch MLP, `random_state` for forests), default 0.
  The seed is written under each model type's own `seed_name` into the 'default' hyperparameters
  (what medium_quality uses) and into distill's, so seeds 0, 1, 2 differ as kd-ops' do.
- `distill(time_limit, teacher_preds='soft')` with AutoGluon's own student set
  (GBM, CAT, NN_TORCH, RF: what its trainer uses when `hyperparameters` is None), seeded.
- The best distilled student is the `_DSTL` model with the best `score_val` in `leaderboard()`
  (the tuning data): how AutoGluon itself would choose; every distilled model is reported.
- Batch-1 latency: p50 of up to 200 `predict_proba(test.iloc[[i]], model=name)` calls on rows
  0..199 of the test split after 10 warm-ups (fewer for a slow model: see `p50_ms`): the call a
  user makes, through AutoGluon's DataFrame feature pipeline. `feature_pipeline_ms_p50` times
  `transform_features` alone on the same rows, and `model_call_ms_p50` the model (or ensemble)
  alone on those rows already transformed: how much of the latency is pipeline, not model.
- Size: bytes on disk of the model's folder and of every model it needs (a weighted ensemble's
  base models), not counting the shared learner/feature-generator pickles; fit seconds likewise
  summed over the model and the models it needs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy and torch load: one thread, as kd-ops' timing

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

LATENCY_ROWS = 200
WARMUPS = 10
MIN_CALLS = 20
LATENCY_BUDGET_S = 8.0
DISTILL_STUDENTS = ("GBM", "CAT", "NN_TORCH", "RF")  # AutoGluon's trainer default for distill()


def seeded(hyperparameters: dict, seed: int) -> dict:
    """`hyperparameters` with `seed` under each model type's own seed key (its `seed_name`)."""
    from autogluon.tabular.registry import ag_model_registry

    out = {}
    for key, configs in hyperparameters.items():
        name = getattr(ag_model_registry.key_to_cls(key), "seed_name", None)
        many = isinstance(configs, list)
        configs = [dict(c) for c in (configs if many else [configs])]
        if name:
            for c in configs:
                c[name] = seed
        out[key] = configs if many else configs[0]
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_bytes(predictor, name: str) -> int:
    """The model's folder plus those of the models it calls (base models of an ensemble)."""
    trainer = predictor._trainer
    total = 0
    for member in trainer.get_minimum_model_set(name):
        rel = trainer.get_model_attribute(member, "path")
        path = Path(trainer.path) / rel
        total += folder_bytes(path if path.exists() else Path(predictor.path) / "models" / member)
    return total


def p50_ms(fn, rows: list[pd.DataFrame]) -> tuple[float, int]:
    """p50 milliseconds of `fn(row)` over the rows, and how many calls it took.

    A slow model (a distilled random forest answers one row in ~0.7 s here) would spend minutes on
    200 calls: after 10 warm-ups (3 when one call takes over 0.1 s) the timing stops at
    LATENCY_BUDGET_S, with at least MIN_CALLS calls, so the whole study fits its time budget."""
    t0 = time.perf_counter()
    fn(rows[0])
    warmups = WARMUPS if time.perf_counter() - t0 < 0.1 else 3
    for i in range(1, warmups):
        fn(rows[i % len(rows)])
    times: list[float] = []
    start = time.perf_counter()
    for row in rows:
        if len(times) >= MIN_CALLS and time.perf_counter() - start > LATENCY_BUDGET_S:
            break
        t0 = time.perf_counter()
        fn(row)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), len(times)


def quality(predictor, test: pd.DataFrame, label: str, positive, name: str) -> dict:
    from sklearn.metrics import roc_auc_score

    y = test[label]
    pred = predictor.predict(test, model=name)
    proba = predictor.predict_proba(test, model=name)
    return {
        "test_accuracy": float((pred.to_numpy() == y.to_numpy()).mean()),
        "test_roc_auc": float(roc_auc_score((y == positive).to_numpy(), proba[positive].to_numpy())),
    }


def measure(predictor, test: pd.DataFrame, label: str, positive, name: str, rows: list, encoded: list) -> dict:
    """Test quality, batch-1 latency (through the pipeline, and of the model alone on `encoded`:
    the same rows already through AutoGluon's feature pipeline), size and fit seconds."""
    out = quality(predictor, test, label, positive, name)
    out["latency_ms_p50"], out["latency_calls"] = p50_ms(lambda r: predictor.predict_proba(r, model=name), rows)
    out["model_call_ms_p50"], _ = p50_ms(lambda r: predictor._trainer.predict_proba(r, model=name), encoded)
    out["model_size_bytes"] = model_bytes(predictor, name)
    members = list(predictor._trainer.get_minimum_model_set(name))
    out["fit_time_s"] = sum(float(predictor._trainer.get_model_attribute(m, "fit_time", default=0.0)) for m in members)
    out["members"] = members
    return out


def main() -> None:
    folder, seed, time_limit = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    distill_limit = float(sys.argv[4]) if len(sys.argv) > 4 else time_limit
    stdout = os.dup(1)
    os.dup2(2, 1)  # AutoGluon's log lines (and anything its models print) go to stderr: stdout is the JSON
    from autogluon.tabular import TabularPredictor
    from autogluon.tabular.configs.hyperparameter_configs import get_hyperparameter_config

    meta = json.loads((folder / "meta.json").read_text())
    label, positive = meta["label"], meta["positive"]
    train, val, test = (pd.read_parquet(folder / f"{part}.parquet") for part in ("train", "val", "test"))
    if isinstance(positive, str) and test[label].dtype == bool:
        positive = positive == "True"
    rows = [test.drop(columns=[label]).iloc[[i % len(test)]] for i in range(LATENCY_ROWS)]

    predictor = TabularPredictor(label, eval_metric="accuracy", path=str(folder / "ag"), verbosity=1)
    t0 = time.perf_counter()
    predictor.fit(
        train,
        tuning_data=val,
        time_limit=time_limit,
        presets="medium_quality",
        hyperparameters=seeded(get_hyperparameter_config("default"), seed),
        num_cpus=1,
        num_gpus=0,
        ag_args_fit={"num_cpus": 1},
    )
    fit_s = time.perf_counter() - t0
    teacher = predictor.model_best
    import autogluon.tabular

    result: dict = {
        "autogluon_version": autogluon.tabular.__version__,
        "seed": seed,
        "time_limit": time_limit,
        "distill_time_limit": distill_limit,
        "fit_s": fit_s,
    }
    result["rows"] = {"train": len(train), "val": len(val), "test": len(test)}
    result["teacher_name"] = teacher
    result["fit_models"] = list(predictor.model_names())
    encoded = [predictor.transform_features(r) for r in rows]
    result["teacher"] = measure(predictor, test, label, positive, teacher, rows, encoded)

    t0 = time.perf_counter()
    names = predictor.distill(
        time_limit=distill_limit,
        teacher_preds="soft",
        hyperparameters=seeded({k: {} for k in DISTILL_STUDENTS}, seed),
    )
    result["distill_s"] = time.perf_counter() - t0
    board = predictor.leaderboard(silent=True)  # score_val: accuracy on the tuning data
    distilled = board[board["model"].str.contains("_DSTL")].sort_values("score_val", ascending=False, kind="stable")
    result["distilled_names"] = list(names)
    result["leaderboard_val"] = board[["model", "score_val", "fit_time"]].to_dict(orient="records")
    result["best_distilled"] = distilled["model"].iloc[0] if len(distilled) else None
    result["distilled"] = {}
    for name, score_val in zip(distilled["model"], distilled["score_val"]):
        figures = measure(predictor, test, label, positive, name, rows, encoded)
        result["distilled"][name] = {"score_val": float(score_val), **figures}
    result["feature_pipeline_ms_p50"], _ = p50_ms(predictor.transform_features, rows)
    os.write(stdout, (json.dumps(result) + "\n").encode())


if __name__ == "__main__":
    main()
