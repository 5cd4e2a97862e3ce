"""The loop on a real year: nycflights13, distilled on January-March, replayed April-December.

Per seed, `examples/flights.yaml` runs as deployed: a Prefect server, `kd-ops deploy` (monitor and
redistill deployments), `kd-ops serve`, and `flows.replay.replay` sending each month's rows over
HTTP with 20% of the true labels arriving a month late; the deployments act on their own. Six arms
are scored on every row of every month (accuracy and ROC AUC; the labels are used only to score):

  (a) static     the first student, never updated
  (b) loop       the kd-ops loop as deployed (triggers, cooldown and gates of examples/flights.yaml)
  (c) labels     a student of the same recipe retrained on labels only, on the loop's triggers,
                 with the labels the loop had then (train split + labelled recent rows), deployed
                 after each trigger without gates
  (d) refit      the loop again with `redistill.teacher: refit` (its own replay, own triggers)
  (e) oracle     the same student retrained every month on the train split and every row the
                 replay sent in every past month, each with its true label
  (f) teacher    the first teacher (LightGBM), never updated

The monitor is also run on the static student's own windows (the rows the replay sent, each with
the labels that had arrived by then), for its detection delay and false-alarm rate, and its
label-free accuracy estimate (ATC) is compared with NannyML's CBPE on the same windows
(`--cbpe-python`: an interpreter with nannyml, see bench/cbpe_worker.py).

    python bench/loop_flights.py --cbpe-python /tmp/nannyml/bin/python     # 3 seeds, ~1 h on 2 cores

Each (seed, arm) runs in a process of its own (Prefect reads its API URL once per process).
Results: `bench/results/loop_flights.{md,json}`, the figure `docs/img/loop-flights.png`, also
logged to the seed-0 loop's MLflow run `loop-flights benchmark`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from shared import RESULTS, ROOT, mean_std, save_results  # bench/shared.py (bench/ is on sys.path when run)

FALL = 0.02  # the static student "falls" in a month when it loses at least 2 points against its test split


# -- one (seed, arm) in its own process ----------------------------------------------------------------
def _server_class():
    from flows.replay import Server

    class RecordingServer(Server):
        """The replay's client, noting which predictions it made and which labels it posted when."""

        def __init__(self, *a: Any, **k: Any):
            super().__init__(*a, **k)
            self.window = -1
            self.predicted: list[tuple[int, str, dict]] = []  # (window, id, record)
            self.labelled: dict[str, tuple[int, Any]] = {}  # id -> (window it arrived in, label)

        def predict(self, records: list[dict]) -> list[dict]:
            out = super().predict(records)
            self.predicted += [(self.window, a["id"], r) for a, r in zip(out, records)]
            return out

        def feedback(self, labels: list[tuple[str, Any]], request_id: str) -> int:
            self.labelled.update({pid: (self.window, y) for pid, y in labels})
            return super().feedback(labels, request_id)

    return RecordingServer


def _classes(schema: Any, values: Any) -> np.ndarray:
    index = {c: i for i, c in enumerate(schema.classes)}
    return np.asarray([index[v.item() if hasattr(v, "item") else v] for v in values], dtype=np.int64)


def child(seed: int, mode: str, out: Path, config: str, cbpe_python: str | None) -> None:
    """One (seed, arm): the replay as deployed (kept in `<out>/seed<S>-<mode>-replay.json`, so a
    rerun goes straight to scoring), then every arm's scores from the stack's MLflow on disk."""
    warnings.simplefilter("ignore")
    from types import SimpleNamespace

    from flows.replay import traffic
    from kd_ops.config.loading import load_config
    from kd_ops.data.datamodule import DistillDataModule
    from kd_ops.evaluation.reference import probabilities
    from kd_ops.models.loading import load_for_data

    work = out / f"seed{seed}-{mode}"
    saved = out / f"seed{seed}-{mode}-replay.json"
    if not saved.exists():
        saved.write_text(json.dumps(_replay(seed, mode, work, config), default=str))
    replayed = json.loads(saved.read_text())
    cfg = load_config(config, replayed["overrides"])
    from kd_ops.registry.tracking import open_tracking

    open_tracking(cfg.tracking.uri)  # every models:/ URI below resolves in the stack's registry
    name, v1 = cfg.registry.name, replayed["first_version"]
    reports = [SimpleNamespace(**r) for r in replayed["reports"]]
    server = SimpleNamespace(
        predicted=[tuple(p) for p in replayed["predicted"]],
        labelled={k: tuple(v) for k, v in replayed["labelled"].items()},
    )
    dm = DistillDataModule(cfg.data, seed)
    dm.setup()
    schema = dm.schema
    full = traffic(cfg, cfg.replay.start, cfg.replay.end, cfg.replay.window)
    months = full.windows
    x_m, y_m = {}, {}
    for m in months:
        part = full.frame[full.periods == m]
        x_m[m] = schema.encode(part, where=f"month {m}", strict=False)
        y_m[m] = _classes(schema, part[full.label])

    def score(model: Any, m: str) -> dict[str, float]:
        from sklearn.metrics import roc_auc_score

        p = probabilities(model, x_m[m])
        return {"accuracy": float((p.argmax(1) == y_m[m]).mean()), "auc": float(roc_auc_score(y_m[m], p[:, 1]))}

    cache: dict[str, Any] = {}

    def version(v: str) -> Any:
        if v not in cache:
            cache[v] = load_for_data(f"models:/{name}/{v}", dm, f"{name} v{v}")
        return cache[v]

    result: dict[str, Any] = {"seed": seed, "mode": mode, "months": months, "replay_s": replayed["replay_s"]}
    result["reports"] = replayed["reports"]
    result["loop"] = [score(version(r.served_versions[0]), r.window) for r in reports]
    result["redistilled"] = [bool(r.redistill and not r.redistill.get("skipped")) for r in reports]
    result["promoted"] = [bool(r.redistill and r.redistill.get("promoted")) for r in reports]
    result["loop_alerts"] = [r.monitor.get("status") == "alert" for r in reports]
    if mode == "keep":
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking.uri)
        client = mlflow.MlflowClient(cfg.tracking.uri)
        teacher_uri = client.get_model_version(name, v1).tags["kd_ops.teacher_model_uri"]
        static, teacher = version(v1), load_for_data(teacher_uri, dm, "the first teacher")
        result["static"] = [score(static, m) for m in months]
        result["teacher"] = [score(teacher, m) for m in months]
        result["static_test_accuracy"] = replayed["static_test_accuracy"]
        result.update(_labels_only(cfg, server, months, x_m, y_m, teacher_uri, score, result))
        result.update(_static_monitor(cfg, name, v1, static, server, months, cbpe_python, work))
        result["tracking_uri"] = cfg.tracking.uri
    (out / f"seed{seed}-{mode}.json").write_text(json.dumps(result, default=str))


def _replay(seed: int, mode: str, work: Path, config: str) -> dict[str, Any]:
    """The loop as deployed on a fresh stack (Prefect server, kd-ops deploy, kd-ops serve)."""
    from flows.demo import _Clock, start_stack
    from flows.replay import DeployedLoop, replay

    overrides = [f"seed={seed}", f"redistill.teacher={mode}", "train.progress_bar=false"]
    stack = start_stack(config, str(work), _Clock(), overrides=overrides)
    try:
        server = _server_class()(stack.url, os.environ["KD_OPS_TOKEN"])

        def on_window(report: Any) -> None:
            print(f"[seed {seed} {mode}] " + report.line(), file=sys.stderr, flush=True)
            server.window += 1

        server.window = 0
        t0 = time.perf_counter()
        reports = replay(stack.cfg, server, DeployedLoop(stack.cfg), seed=seed, on_window=on_window)
        return {
            "overrides": stack.overrides,
            "first_version": stack.first_version,
            "static_test_accuracy": stack.distilled["student"]["test_accuracy"],
            "replay_s": time.perf_counter() - t0,
            "reports": [r.to_json() for r in reports],
            "predicted": server.predicted,
            "labelled": server.labelled,
        }
    finally:
        stack.stop()


def _labels_only(cfg, server, months, x_m, y_m, teacher_uri, score, result) -> dict[str, Any]:
    """(c) on the loop's triggers with the labels the loop had, and (e) the monthly oracle."""
    from kd_ops.data.datamodule import ExtraRows
    from kd_ops.pipeline.distillation import run_distillation

    schema = None

    def recipe(registry: str):
        return cfg.model_copy(
            update={
                "teacher": cfg.teacher.model_copy(update={"uri": teacher_uri}),
                "distill": cfg.distill.model_copy(update={"kd_weight": 0.0, "ce_weight": 1.0, "baseline": False}),
                "registry": cfg.registry.model_copy(update={"name": registry, "promote": False}),
                "gates": {},
                "evaluation": cfg.evaluation.model_copy(update={"edge": []}),
            }
        )

    def train(registry: str, x: np.ndarray, y: np.ndarray) -> Any:
        return run_distillation(recipe(registry), extra=ExtraRows(x, y)).models["student"]

    from kd_ops.data.datamodule import DistillDataModule

    dm = DistillDataModule(cfg.data, cfg.seed)
    dm.setup()
    schema = dm.schema
    import pandas as pd

    ids = [pid for _, pid, _ in server.predicted]
    windows = np.asarray([w for w, _, _ in server.predicted])
    records = pd.DataFrame.from_records([r for _, _, r in server.predicted])
    x_sent = schema.encode(records, where="sent records", strict=False)
    labels = {pid: (w, y) for pid, (w, y) in server.labelled.items()}
    n_recent = cfg.redistill.production_rows
    labels_only, model = [], None
    for i, m in enumerate(months):
        labels_only.append(score(model, m) if model is not None else result["static"][i])
        if result["redistilled"][i]:
            # The loop's production set at this trigger: the latest rows sent, with the labels posted by then.
            upto = np.flatnonzero(windows <= i)[-n_recent:]
            known = [j for j in upto if ids[j] in labels and labels[ids[j]][0] <= i]
            y = _classes(schema, [labels[ids[j]][1] for j in known])
            model = train(f"{cfg.registry.name}-labels-only", x_sent[known], y)
    # The oracle sees the same traffic as the loop (each past month's rows that the replay sent,
    # drawn again with the replay's seeds), every row with its true label, at once.
    from flows.replay import traffic

    data = traffic(cfg, cfg.replay.start, cfg.replay.end, cfg.replay.window)
    sent_x, sent_y = [], []
    for i, m in enumerate(months):
        part = data.rows(m, cfg.replay.rows_per_window, cfg.seed + i)
        sent_x.append(schema.encode(part, where=f"month {m}", strict=False))
        sent_y.append(_classes(schema, part[data.label]))
    oracle = [result["static"][0]]
    for i in range(1, len(months)):
        x, y = np.concatenate(sent_x[:i]), np.concatenate(sent_y[:i])
        oracle.append(score(train(f"{cfg.registry.name}-oracle", x, y), months[i]))
    return {"labels_only": labels_only, "oracle": oracle}


def _static_monitor(cfg, name, v1, static, server, months, cbpe_python, work) -> dict[str, Any]:
    """The monitor on the static student's windows: what it says, and its label-free estimates."""
    import dataclasses

    import pandas as pd

    from kd_ops.evaluation.reference import load_reference, probabilities, typed_columns
    from monitors.decision import judge
    from monitors.window import Window

    reference = load_reference(name, v1, cfg.tracking.uri)
    schema, slicer = reference.schema, reference.input_slicer()
    windows = np.asarray([w for w, _, _ in server.predicted])
    records = pd.DataFrame.from_records([r for _, _, r in server.predicted])
    x = schema.encode(records, where="sent records", strict=False)
    ids = [pid for _, pid, _ in server.predicted]
    label_of = {pid: (w, y) for pid, (w, y) in server.labelled.items()}
    probs = probabilities(static, x)
    truth = np.full(len(ids), np.nan)
    arrived = np.full(len(ids), np.nan)
    index = {c: i for i, c in enumerate(schema.classes)}
    for j, pid in enumerate(ids):
        if pid in label_of:
            arrived[j], truth[j] = label_of[pid][0], index[label_of[pid][1]]
    out: dict[str, list] = {"static_monitor": [], "atc": [], "cbpe": []}
    cbpe_windows = []

    def window(rows: np.ndarray, labels: np.ndarray) -> Window:
        xs = x[rows]
        return Window(
            name,
            v1,
            xs,
            probs[rows],
            labels,
            np.full(len(xs), np.nan),
            slicer.compute(xs) if slicer else {},
            schema=schema,
            table=typed_columns(schema, xs),
        )

    for i, _ in enumerate(months):
        rows = np.flatnonzero(windows == i)
        # labels that had arrived by this window's end, for the window and the one before it
        before = np.flatnonzero((windows >= i - 1) & (windows <= i) & (arrived <= i))
        w = window(rows, np.full(len(rows), np.nan))
        if len(before):
            w = dataclasses.replace(w, feedback=window(before, truth[before]))
        verdict = judge(w, reference, cfg.monitor)
        out["static_monitor"].append({"status": verdict.status, "reasons": [r.message for r in verdict.reasons]})
        out["atc"].append(verdict.metrics.get("estimated_accuracy"))
        cbpe_windows.append(probs[rows])
    out["static_window_rows"] = [int((windows == i).sum()) for i in range(len(months))]
    if cbpe_python:
        data = work / "cbpe.npz"
        np.savez(
            data,
            ref_probs=reference.probabilities,
            ref_labels=reference.labels,
            **{f"win_{i}": p for i, p in enumerate(cbpe_windows)},
        )
        done = subprocess.run(
            [cbpe_python, str(ROOT / "bench" / "cbpe_worker.py"), str(data), str(len(cbpe_windows))],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode == 0:
            out["cbpe"] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            print(f"CBPE failed: {done.stderr[-2000:]}", file=sys.stderr)
    return out


# -- the parent: every (seed, arm), then the tables and the figure -------------------------------------
ARMS = {
    "static": "(a) static student",
    "loop": "(b) kd-ops loop",
    "labels_only": "(c) labels-only retrain",
    "refit": "(d) loop, teacher refit",
    "oracle": "(e) oracle (all past labels)",
    "teacher": "(f) teacher",
}


def _series(per_seed: list[dict], arm: str, metric: str = "accuracy") -> np.ndarray:
    """(seeds, months) of one arm."""
    return np.asarray([[m[metric] for m in s[arm]] for s in per_seed])


def report(per_seed: list[dict], args: argparse.Namespace) -> tuple[str, dict]:
    months = per_seed[0]["months"]
    lines = [
        f"`python bench/loop_flights.py` (examples/flights.yaml, seeds {[s['seed'] for s in per_seed]}; each month"
        f" {per_seed[0]['reports'][0]['rows']} rows sent over HTTP, 20% of labels a month late; every arm scored on"
        " every row of the month, labels used only to score)",
        "",
        "Accuracy per month, mean ± std over seeds:",
        "",
        "| month | " + " | ".join(ARMS.values()) + " | loop re-distilled / promoted | static monitor |",
        "| --- |" + " --- |" * (len(ARMS) + 2),
    ]
    acc = {arm: _series(per_seed, arm) for arm in ARMS}
    auc = {arm: _series(per_seed, arm, "auc") for arm in ARMS}
    for i, m in enumerate(months):
        re = sum(s["redistilled"][i] for s in per_seed)
        pr = sum(s["promoted"][i] for s in per_seed)
        alerts = ", ".join(sorted({s["static_monitor"][i]["status"] for s in per_seed}))
        cells = " | ".join(mean_std(list(acc[a][:, i])) for a in ARMS)
        lines.append(f"| {m} | {cells} | {re}/{pr} of {len(per_seed)} | {alerts} |")
    lines.append("| all months | " + " | ".join(mean_std(list(acc[a].mean(1))) for a in ARMS) + " | | |")
    lines.append("| ROC AUC, all months | " + " | ".join(mean_std(list(auc[a].mean(1))) for a in ARMS) + " | | |")

    # targets
    base = np.asarray([s["static_test_accuracy"] for s in per_seed])
    falls = acc["static"] <= base[:, None] - FALL  # (seeds, months)
    ratios, b_minus_c, after_months = [], [], []
    for k, s in enumerate(per_seed):
        alerts = np.flatnonzero(s["loop_alerts"])
        first = int(alerts[0]) if len(alerts) else len(months)
        after = np.arange(first + 1, len(months))
        after_months.append(len(after))
        if len(after):
            gap = acc["oracle"][k, after].mean() - acc["static"][k, after].mean()
            won = acc["loop"][k, after].mean() - acc["static"][k, after].mean()
            ratios.append(won / gap if abs(gap) > 1e-9 else float("nan"))
            b_minus_c.append(acc["loop"][k, after].mean() - acc["labels_only"][k, after].mean())
    static_alerts = np.asarray([[w["status"] == "alert" for w in s["static_monitor"]] for s in per_seed])
    loop_alerts = np.asarray([s["loop_alerts"] for s in per_seed])
    quiet = ~falls
    false_static = static_alerts[quiet].sum(), int(quiet.sum())
    false_loop = loop_alerts[quiet].sum(), int(quiet.sum())
    delays = []
    for k in range(len(per_seed)):
        fell = np.flatnonzero(falls[k])
        if len(fell):
            later = [i for i in np.flatnonzero(static_alerts[k]) if i >= fell[0]]
            delays.append(float(later[0] - fell[0]) if later else float("nan"))
    lines += [
        "",
        "Targets (over the months after the loop's first alert, per seed, then mean ± std):",
        "",
        "| target | figure | met |",
        "| --- | --- | --- |",
        f"| loop recovers >= 70% of the static-to-oracle gap | {mean_std(ratios, '.0%')} |"
        f" {'yes' if ratios and np.nanmean(ratios) >= 0.7 else 'no'} |",
        f"| loop beats labels-only retraining (b - c, accuracy) | {mean_std(b_minus_c, '+.4f')} |"
        f" {'yes' if b_minus_c and np.mean(b_minus_c) > 0 else 'no'} |",
        f"| no alert where the static student loses < 2 points (static monitor) | {false_static[0]} alerts in"
        f" {false_static[1]} such months | {'yes' if false_static[0] == 0 else 'no'} |",
        f"| the same, the loop's own monitor (judging whichever version serves) | {false_loop[0]} alerts in"
        f" {false_loop[1]} such months | {'yes' if false_loop[0] == 0 else 'no'} |",
        "",
        f"The static student's test accuracy (late March): {mean_std(list(base))}; it falls (>= {FALL:.0%} below"
        f" it) in {int(falls.sum())} of {falls.size} seed-months. Detection delay of the static monitor, in months"
        f" from the first fall to the first alert at or after it: {mean_std(delays, '.1f')}.",
    ]
    truth = acc["static"]
    atc = np.asarray([[np.nan if v is None else v for v in s["atc"]] for s in per_seed], dtype=float)
    atc_error = mean_std(list(np.nanmean(np.abs(atc - truth), 1)), ".4f")
    lines += [
        "",
        "Label-free accuracy estimates of the static student per month (true: its accuracy on every row of the month):",
        "",
        "| estimator | mean absolute error |",
        "| --- | --- |",
        f"| kd-ops ATC (confidence threshold set on the reference) | {atc_error} |",
    ]
    if all(s.get("cbpe") for s in per_seed):
        cbpe = np.asarray([s["cbpe"] for s in per_seed], dtype=float)
        lines.append(f"| NannyML CBPE | {mean_std(list(np.nanmean(np.abs(cbpe - truth), 1)), '.4f')} |")
    else:
        lines.append("| NannyML CBPE | not run (give --cbpe-python) |")
    lines += [
        "",
        "Time per seed: replay of the loop (HTTP, monitor and redistill deployments) "
        + mean_std([s["replay_s"] for s in per_seed], ".0f")
        + " s; with refit "
        + mean_std([s["refit_replay_s"] for s in per_seed], ".0f")
        + " s.",
    ]
    payload = {
        "args": vars(args),
        "seeds": per_seed,
        "targets": {
            "gap_recovered": ratios,
            "loop_minus_labels_only": b_minus_c,
            "false_alarms_static": list(map(int, false_static)),
            "false_alarms_loop": list(map(int, false_loop)),
            "detection_delay_months": delays,
        },
    }
    return "\n".join(lines), payload


def figure(per_seed: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = per_seed[0]["months"]
    t = np.arange(len(months))
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    for arm, style in (
        ("static", "k--"),
        ("loop", "C0-"),
        ("labels_only", "C1-"),
        ("oracle", "C2:"),
        ("teacher", "C7-."),
    ):
        a = _series(per_seed, arm)
        ax.plot(t, a.mean(0), style, marker="o", ms=3, label=ARMS[arm])
        ax.fill_between(
            t, a.mean(0) - a.std(0), a.mean(0) + a.std(0), color=style[:2] if style[0] == "C" else "k", alpha=0.1
        )
    loop = _series(per_seed, "loop").mean(0)
    for i in t:
        re = sum(s["redistilled"][i] for s in per_seed)
        pr = sum(s["promoted"][i] for s in per_seed)
        if re:
            ax.annotate(
                f"{pr}/{re}",
                (i, loop[i]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=7,
                color="C0",
            )
            ax.axvline(i, color="C0", alpha=0.08, lw=6)
    ax.set_xticks(t, months, rotation=30)
    ax.set_ylabel("accuracy, every row of the month")
    ax.set_title(
        "nycflights13 2013: the loop month by month (shaded: re-distilled; promoted/re-distilled of seeds)", fontsize=8
    )
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default=str(ROOT / "examples" / "flights.yaml"))
    parser.add_argument("--cbpe-python", help="an interpreter with nannyml installed (see bench/cbpe_worker.py)")
    parser.add_argument("--work", help="where the seeds' MLflow, logs and Prefect databases stay (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "loop_flights"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "img" / "loop-flights.png"))
    parser.add_argument("--child", choices=["keep", "refit"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.seed, args.child, Path(args.child_out), args.config, args.cbpe_python)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="kd-ops-loop-flights-"))
    work.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in ("keep", "refit"):
            if not (work / f"seed{seed}-{mode}.json").exists():
                cmd = [sys.executable, __file__, "--child", mode, "--seed", str(seed), "--child-out", str(work)]
                cmd += ["--config", args.config] + (["--cbpe-python", args.cbpe_python] if args.cbpe_python else [])
                subprocess.run(cmd, check=True, cwd=ROOT)
        keep = json.loads((work / f"seed{seed}-keep.json").read_text())
        refit = json.loads((work / f"seed{seed}-refit.json").read_text())
        keep["refit"], keep["refit_replay_s"] = refit["loop"], refit["replay_s"]
        keep["refit_promoted"] = refit["promoted"]
        per_seed.append(keep)
    text, payload = report(per_seed, args)
    print(text)
    save_results(args.out, text, payload)
    figure(per_seed, Path(args.figure))
    import mlflow

    client = mlflow.MlflowClient(per_seed[0]["tracking_uri"])
    exp = client.get_experiment_by_name("kd-ops-flights")
    run = client.create_run(exp.experiment_id, run_name="loop-flights benchmark")
    client.log_artifact(run.info.run_id, args.figure)
    client.log_artifact(run.info.run_id, f"{args.out}.md")
    client.set_terminated(run.info.run_id)
    print(f"figure {args.figure}; logged to MLflow run {run.info.run_id} at {per_seed[0]['tracking_uri']}")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # the seeds' processes run side by side on few cores
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("KD_OPS_QUIET", "1")
    main()
