"""What the serving and monitoring benchmarks share: a quickly trained digits recipe and the way
results are written (`<out>.md` for people, `<out>.json` for tools)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def digits_recipe(
    root: Path, name: str, seed: int = 0, teacher_epochs: int = 2, student_epochs: int = 3, min_steps: int = 0
) -> dict[str, Any]:
    """`examples/digits.yaml` trained briefly into a fresh SQLite registry under `root`: no edge exports,
    no gates, few timing repeats. Registered as `name`, in experiment `name`."""
    raw = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    raw["seed"] = seed
    raw["teacher"]["epochs"] = teacher_epochs
    raw["student"].update(epochs=student_epochs, min_steps=min_steps)
    raw["evaluation"] = {"edge": [], "latency_repeats": 5, "throughput_repeats": 1}
    raw["gates"] = {}
    raw["train"] = {"progress_bar": False}
    raw["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": name}
    raw["registry"] = {"name": name}
    return raw


def save_results(out: str, text: str, payload: dict[str, Any]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text + "\n")
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1, default=str))


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """(mean, std) over seeds (std 0 for one value); NaN entries are left out, nothing left gives NaNs."""
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def mean_std(values: list[float], fmt: str = ".3f") -> str:
    """`mean ± std` over seeds or rounds (std 0 for one value); NaN entries are left out, and
    nothing left gives "-"."""
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):{fmt}} ± {sd:{fmt}}"


def teacher_uri(result: Any) -> str:
    """The model URI of a distillation's teacher (trained in the run or given), from its run's tags:
    what a benchmark passes as `teacher.uri` so that every later run distils from the same teacher."""
    from mlflow.tracking import MlflowClient

    from kd_ops.registry.tracking import TAG_TEACHER_URI

    return MlflowClient(result.tracking_uri).get_run(result.runs["teacher"]).data.tags[TAG_TEACHER_URI]
