"""Does the loop win back what drift took, without new labels, and how long does each stage take?

Per seed, `examples/loop.yaml` (a teacher trained to read corrupted scans, an MLP student
distilled on clean rows) is distilled into a fresh registry: champion v1. Then per scenario:

  traffic    `--rows` drifted rows answered by the champion, written to a fresh prediction log
  monitor    `monitors.monitor.run_monitor` on the latest window (recorded in MLflow + Evidently)
  redistill  `kd_ops.pipeline.redistill.run_redistillation`: the teacher labels the logged rows, a new
             student is distilled, gated against the champion, promoted or not
  evaluate   accuracy on 1000 fresh rows of the scenario (labels used only here) of the old
             champion, the new one and the teacher; recovery = (new - old) / (old on clean - old)

The champion is set back to v1 (forced) before each scenario. What the demo adds on top (Prefect
server, deployments, HTTP) is timed by `make demo` itself. Results: mean ± std over seeds in
`bench/results/loop.md`; target: recovery of at least 70%.

A table's rows are logged as the raw records a client sends (for text: the strings), and rows
whose scenario gives no true label (`plots`: plot summaries, not reviews) are left out of the
accuracies.

    python bench/loop.py                      # 3 seeds x 3 scenarios, ~15 minutes on 2 cores
    python bench/loop.py --config examples/rotten-tomatoes.yaml --scenarios typos,new_words,plots \
        --out bench/results/loop_text         # text
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml
from shared import RESULTS, ROOT, mean_std, save_results  # bench/shared.py (bench/ is on sys.path when run)

# Below this loss the recovery ratio is noise: 1000 rows drawn from a 360-row test split measure
# an accuracy to about one point, and a difference of two to about 1.5.
MIN_LOSS = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scenarios", default="shift,noise,contrast")
    parser.add_argument("--rows", type=int, default=1000, help="drifted rows logged before re-distillation")
    parser.add_argument("--config", default=str(ROOT / "examples" / "loop.yaml"))
    parser.add_argument("--out", default=str(RESULTS / "loop"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from kd_ops.config.loading import config_from_dict
    from kd_ops.core.env import apply_offline_defaults
    from kd_ops.data.scenarios import sample
    from kd_ops.evaluation.reference import probabilities
    from kd_ops.models.loading import load_model
    from kd_ops.pipeline.distillation import run_distillation
    from kd_ops.pipeline.redistill import predict_classes, run_redistillation
    from kd_ops.prediction_log.client import PredictionLog
    from kd_ops.prediction_log.protocol import prediction_batch
    from kd_ops.prediction_log.store import predictions
    from kd_ops.registry import promotion
    from monitors.monitor import run_monitor

    apply_offline_defaults()

    def accuracy(model, x, y) -> float:
        """On the rows with a true label (a scenario marks the others -1)."""
        known = y >= 0
        return float((predict_classes(model, x[known]) == y[known]).mean())

    def client_records(frame) -> list[dict]:
        """Rows as a client sends them: JSON values, null for a missing one."""
        return json.loads(frame.to_json(orient="records"))
    seeds = [int(s) for s in args.seeds.split(",")]
    scenarios = args.scenarios.split(",")
    per_seed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kd-ops-loop-") as tmp:
        for seed in seeds:
            root = Path(tmp) / f"seed{seed}"
            root.mkdir()
            raw = yaml.safe_load(Path(args.config).read_text())
            raw["seed"] = seed
            raw["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "loop"}
            raw.setdefault("monitor", {}).update(
                workspace=str(root / "evidently"), alerts={"state_file": str(root / "a.json")}
            )
            raw.setdefault("redistill", {})["production_rows"] = args.rows
            t0 = time.perf_counter()
            first = run_distillation(config_from_dict(raw, "loop"))
            distill_s = time.perf_counter() - t0
            name, v1 = first.registered["name"], first.registered["version"]
            dm, old, teacher = first.datamodule, first.models["student"], first.models["teacher"]
            x_clean, y_clean = sample(dm, "clean", 1000, seed=10_000 + seed)
            clean_old = accuracy(old, x_clean, y_clean)
            schema = getattr(dm, "schema", None)
            runs: dict[str, dict] = {}
            for k, scenario in enumerate(scenarios):
                promotion.promote(name, v1, force=True, uri=raw["tracking"]["uri"])
                raw["monitor"]["store"] = f"sqlite:///{root}/predictions-{scenario}.db"
                cfg = config_from_dict(raw, "loop")
                t = {}
                t0 = time.perf_counter()
                x, _ = sample(dm, scenario, args.rows, seed=100 * seed + k)
                probs = probabilities(old, x)
                log = PredictionLog.open_sync(cfg.monitor.store)
                for i in range(0, len(x), 100):
                    part = x[i : i + 100]
                    records = client_records(schema.decode(part)) if schema is not None else None
                    batch = prediction_batch(name, v1, part, probs[i : i + 100], [{}] * len(part), records=records)
                    log.write(predictions, batch)
                log.close()
                t["traffic"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                verdict = run_monitor(cfg, notify=False)
                t["monitor"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = run_redistillation(cfg, trigger=f"bench {scenario}")
                t["redistill"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                new = load_model(f"models:/{name}/{result.candidate_version}") if result.candidate_version else old
                x_test, y_test = sample(dm, scenario, 1000, seed=20_000 + 100 * seed + k)
                acc = {
                    "old": accuracy(old, x_test, y_test),
                    "new": accuracy(new, x_test, y_test),
                    "teacher": accuracy(teacher, x_test, y_test),
                    "new_clean": accuracy(new, x_clean, y_clean),
                }
                t["evaluate"] = time.perf_counter() - t0
                lost = clean_old - acc["old"]
                # A champion that was kept serves on: its accuracy is the old one.
                served = acc["new"] if result.promoted else acc["old"]
                runs[scenario] = {
                    "monitor": verdict.status,
                    "promoted": result.promoted,
                    "reason": result.reason,
                    "accuracy": acc,
                    "lost": lost,
                    "recovered": (served - acc["old"]) / lost if lost >= MIN_LOSS else float("nan"),
                    "seconds": t,
                }
                print(json.dumps({"seed": seed, "scenario": scenario, **runs[scenario]}), file=sys.stderr)
            per_seed.append({"seed": seed, "distill_s": distill_s, "clean_old": clean_old, "runs": runs})

    lines = [
        f"`python bench/loop.py` ({Path(args.config).name}, seeds {seeds}, {args.rows} drifted rows logged per"
        " scenario, accuracy on 1000 fresh rows of the scenario; no feedback label anywhere)",
        "",
        "| scenario | monitor | old champion | new champion | teacher | new on clean | promoted | recovered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in scenarios:
        rs = [s["runs"][scenario] for s in per_seed]
        statuses = ", ".join(sorted({r["monitor"] for r in rs}))
        lines.append(
            f"| {scenario} | {statuses} | {mean_std([r['accuracy']['old'] for r in rs])}"
            f" | {mean_std([r['accuracy']['new'] for r in rs])} | {mean_std([r['accuracy']['teacher'] for r in rs])}"
            f" | {mean_std([r['accuracy']['new_clean'] for r in rs])} | {sum(r['promoted'] for r in rs)}/{len(rs)}"
            f" | {mean_std([r['recovered'] for r in rs], '.0%')} |"
        )
    lines += [
        "",
        f"Old champion on clean rows: {mean_std([s['clean_old'] for s in per_seed])}. Recovered = (served - old)"
        f" / (old on clean - old), where served is the new champion if promoted, else the old; left out (-) where"
        f" the scenario cost the champion less than {MIN_LOSS:.0%}.",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        f"| distill (teacher + student, first champion) | {mean_std([s['distill_s'] for s in per_seed], '.1f')} |",
    ]
    for stage in ("traffic", "monitor", "redistill", "evaluate"):
        values = [r["seconds"][stage] for s in per_seed for r in s["runs"].values()]
        lines.append(f"| {stage} (per scenario) | {mean_std(values, '.1f')} |")
    text = "\n".join(lines)
    print(text)
    save_results(args.out, text, {"args": vars(args), "seeds": per_seed})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
