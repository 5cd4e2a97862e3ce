"""Does the monitor catch drift, fast, without crying wolf, and how good are its label-free estimates?

Per seed, a digits student is distilled (the example recipe, trained briefly; its teacher is the
shadow) and its reference built from the validation split. Traffic is drawn from the test split,
`--rows` per window, with feedback labels on `--labelled` of the rows and shadow-teacher scores
on `--shadowed` of them:

  no drift      `--clean-windows` clean windows: the false-alarm rate is the share that alert
  each scenario `--lead` clean windows, then `--drift-windows` drifted ones (noise, shift, contrast,
                prior_shift, slice_noise): detected if any drifted window alerts; the delay is the
                number of drifted windows seen until the first alert (1 = at once)

Label-free accuracy estimates are scored against the true accuracy of every window (all labels
are known to the bench): the monitor's confidence estimate (ATC: a confidence threshold set on
the reference), the shadow-teacher estimate (reference accuracy minus the drop in agreement), and,
with `--cbpe-python`, NannyML's CBPE run in that interpreter (its own environment:
`bench/cbpe_worker.py`). Results: mean ± std over seeds, in `bench/results/monitor_quality.md`.

    python bench/monitor_quality.py                         # 3 seeds, ~10 minutes on 2 cores
    python bench/monitor_quality.py --cbpe-python /tmp/nannyml/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from shared import (  # bench/shared.py (bench/ is on sys.path when run)
    RESULTS,
    ROOT,
    digits_recipe,
    mean_std,
    save_results,
)

SCENARIOS = ("noise", "shift", "contrast", "prior_shift", "slice_noise")


def distil(seed: int, root: Path):
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

    raw = digits_recipe(root, f"mq-{seed}", seed, teacher_epochs=10, student_epochs=20, min_steps=400)
    return run_distillation(config_from_dict(raw, "monitor-quality"))


def make_window(result, scenario: str, rows: int, seed: int, labelled: float, shadowed: float):
    import torch

    from kd_ops.data.scenarios import sample
    from monitors.window import Window

    dm = result.datamodule
    x, y = sample(dm, scenario, rows, seed=seed)
    with torch.inference_mode():
        probs = torch.softmax(result.models["student"](torch.as_tensor(x)), 1).numpy()
        teacher = result.models["teacher"](torch.as_tensor(x)).argmax(1).numpy().astype(float)
    rng = np.random.default_rng(seed + 1)
    labels = np.where(rng.random(rows) < labelled, y, np.nan)
    teacher = np.where(rng.random(rows) < shadowed, teacher, np.nan)
    window = Window("m", "1", x, probs, labels, teacher, dm.input_slices().compute(x))
    return window, float((probs.argmax(1) == y).mean())


def cbpe(python: str, reference, windows: list) -> list[float]:
    """NannyML CBPE's accuracy estimate per window, computed in another interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.npz"
        arrays = {"ref_probs": reference.probabilities, "ref_labels": reference.labels}
        arrays.update({f"win_{i}": w.probabilities for i, w in enumerate(windows)})
        np.savez(data, **arrays)
        out = subprocess.run(
            [python, str(ROOT / "bench" / "cbpe_worker.py"), str(data), str(len(windows))],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--clean-windows", type=int, default=20)
    parser.add_argument("--lead", type=int, default=2)
    parser.add_argument("--drift-windows", type=int, default=3)
    parser.add_argument("--labelled", type=float, default=0.2, help="share of rows whose label arrives")
    parser.add_argument("--shadowed", type=float, default=0.2, help="share of rows the shadow teacher scores")
    parser.add_argument("--cbpe-python", help="an interpreter with nannyml installed (see bench/cbpe_worker.py)")
    parser.add_argument("--out", default=str(RESULTS / "monitor_quality"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from kd_ops.config.monitoring import MonitorConfig
    from kd_ops.core.env import apply_offline_defaults
    from kd_ops.evaluation.reference import build_reference
    from monitors.decision import judge

    apply_offline_defaults()
    cfg = MonitorConfig()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kd-ops-monitor-quality-") as tmp:
        for seed in seeds:
            result = distil(seed, Path(tmp))
            reference = build_reference(result.models["student"], result.models["teacher"], result.datamodule)
            ref_agree = float((reference.predicted == reference.teacher_probabilities.argmax(1)).mean())
            runs: dict[str, dict] = {}
            all_windows, truths, conf_est, shadow_est = [], [], [], []

            def judged(scenario: str, k: int):
                window, truth = make_window(result, scenario, args.rows, 1000 * seed + k, args.labelled, args.shadowed)
                out = judge(window, reference, cfg)
                all_windows.append(window)
                truths.append(truth)
                conf_est.append(out.metrics.get("estimated_accuracy", np.nan))
                agree = out.metrics.get("agreement_with_teacher")
                shadow_est.append(reference.accuracy - (ref_agree - agree) if agree is not None else np.nan)
                return out

            clean = [judged("clean", k) for k in range(args.clean_windows)]
            runs["no drift"] = {
                "false_alarm_rate": float(np.mean([o.status == "alert" for o in clean])),
                "warn_rate": float(np.mean([o.status == "warn" for o in clean])),
                "signals": sorted({r.signal for o in clean for r in o.reasons if r.status == "alert"}),
            }
            for j, scenario in enumerate(SCENARIOS):
                lead = [judged("clean", 100 * (j + 1) + k) for k in range(args.lead)]
                drift = [judged(scenario, 100 * (j + 1) + args.lead + k) for k in range(args.drift_windows)]
                alerts = [o.status == "alert" for o in drift]
                runs[scenario] = {
                    "detected": float(any(alerts)),
                    "delay": float(alerts.index(True) + 1) if any(alerts) else float("nan"),
                    "false_alarms_before": float(np.mean([o.status == "alert" for o in lead])),
                    "signals": sorted({r.signal for o in drift for r in o.reasons if r.status == "alert"}),
                }
            truths_a = np.array(truths)
            errors = {
                "confidence (kd-ops)": float(np.nanmean(np.abs(np.array(conf_est) - truths_a))),
                "shadow teacher (kd-ops)": float(np.nanmean(np.abs(np.array(shadow_est) - truths_a))),
            }
            if args.cbpe_python:
                errors["CBPE (NannyML)"] = float(
                    np.mean(np.abs(np.array(cbpe(args.cbpe_python, reference, all_windows)) - truths_a))
                )
            per_seed.append(
                {"seed": seed, "runs": runs, "estimate_mae": errors, "reference_accuracy": reference.accuracy}
            )
            print(json.dumps(per_seed[-1]), file=sys.stderr)

    lines = [
        f"`python bench/monitor_quality.py` (digits, seeds {seeds}, {args.rows} rows per window, labels on"
        f" {args.labelled:.0%} and shadow scores on {args.shadowed:.0%} of rows, {args.clean_windows} clean windows,"
        f" {args.lead} clean then {args.drift_windows} drifted windows per scenario; default thresholds)",
        "",
        "| traffic | detection rate | delay (windows) | false alarms | signals that alerted |",
        "| --- | --- | --- | --- | --- |",
    ]
    nd = [s["runs"]["no drift"] for s in per_seed]
    false_alarms, warns = mean_std([r["false_alarm_rate"] for r in nd]), mean_std([r["warn_rate"] for r in nd])
    clean_signals = ", ".join(sorted({sig for r in nd for sig in r["signals"]})) or "-"
    lines.append(f"| no drift | - | - | {false_alarms} (warn {warns}) | {clean_signals} |")
    for scenario in SCENARIOS:
        rs = [s["runs"][scenario] for s in per_seed]
        signals = sorted({sig for r in rs for sig in r["signals"]})
        lines.append(
            f"| {scenario} | {mean_std([r['detected'] for r in rs])} | {mean_std([r['delay'] for r in rs])}"
            f" | {mean_std([r['false_alarms_before'] for r in rs])} | {', '.join(signals)} |"
        )
    lines += [
        "",
        "Label-free accuracy estimates, mean absolute error against the true window accuracy (all windows):",
        "",
    ]
    lines += ["| estimator | MAE |", "| --- | --- |"]
    for name in per_seed[0]["estimate_mae"]:
        lines.append(f"| {name} | {mean_std([s['estimate_mae'][name] for s in per_seed])} |")
    text = "\n".join(lines)
    print(text)
    save_results(args.out, text, {"args": vars(args), "seeds": per_seed})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
