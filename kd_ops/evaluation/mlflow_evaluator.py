"""`evaluators=["distillation"]` for `mlflow.models.evaluate`: a student judged against its teacher.

Registered through the `mlflow.model_evaluator` entry point, so anyone with MLflow and kd-ops
installed can score any classifier pair, kd-ops-made or not:

    mlflow.models.evaluate(student_uri, df, targets="label", model_type="classifier",
                           evaluators="distillation", evaluator_config={"teacher": teacher_uri})

(With a list, `evaluators=["distillation", ...]`, MLflow wants the config per evaluator name:
`evaluator_config={"distillation": {"teacher": teacher_uri}}`.)

It logs to the evaluation run `fidelity` (top-1 agreement with the teacher), `kl_teacher_student`
(mean KL of the teacher's distribution to the student's), `student_accuracy`, `teacher_accuracy`,
`accuracy_retention`, `compression_ratio` (parameters), `size_ratio` (serialized bytes) and
`speedup` (batch-of-1 p50 latency, one CPU thread), using the same code as kd-ops' own metrics.
Optional `evaluator_config` keys: `latency_repeats` (default 100); `allow_pickle` (default False):
consent to load a teacher whose file runs code when loaded (a pickle model, a pt2 archive with
pickled records, skops types kd-ops does not trust), which is refused otherwise. (The student is
loaded by MLflow itself, under MLflow's own `MLFLOW_ALLOW_PICKLE_DESERIALIZATION`.)

Heavy imports happen inside `evaluate`: MLflow loads this module when it starts.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator


class DistillationEvaluator(ModelEvaluator):
    name = "distillation"

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type == "classifier" and bool((evaluator_config or {}).get("teacher"))

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, **kwargs) -> EvaluationResult:
        import numpy as np
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from kd_ops.evaluation.metrics import model_candidate, single_thread, timing_metrics
        from kd_ops.models.loading import load_model
        from kd_ops.registry.lineage import lineage

        config = dict(evaluator_config or {})
        teacher_uri = config["teacher"]
        if model is None:
            raise MlflowException("the distillation evaluator needs a student model, not static predictions")
        try:
            teacher = load_model(teacher_uri, allow_pickle=bool(config.get("allow_pickle", False)))
        except Exception as exc:
            hint = " (here: evaluator_config['allow_pickle'] = True)" if "--allow-pickle" in str(exc) else ""
            raise MlflowException(
                f"evaluator_config['teacher'] = {teacher_uri!r}: cannot load it: {exc}{hint}"
            ) from None
        raw_student = model.get_raw_model() if hasattr(model, "get_raw_model") else None
        student = raw_student if raw_student is not None else model
        x = np.asarray(dataset.features_data, dtype=np.float32)
        y = np.asarray(dataset.labels_data).astype(np.int64)

        with lineage(teacher_model_uri=teacher_uri):
            s, t = model_candidate(student, "student"), model_candidate(teacher, "teacher")
            s_logp, t_logp = _log_probs(s.predict(x)), _log_probs(t.predict(x))
            repeats = int(config.get("latency_repeats", 100))
            with single_thread():
                s_lat = timing_metrics(s.predict, x, repeats, throughput_batch=1)["latency_ms_p50"]
                t_lat = timing_metrics(t.predict, x, repeats, throughput_batch=1)["latency_ms_p50"]
            s_acc = float((s_logp.argmax(1) == y).mean())
            t_acc = float((t_logp.argmax(1) == y).mean())
            t_p = np.exp(t_logp)
            metrics = {
                "fidelity": float((s_logp.argmax(1) == t_logp.argmax(1)).mean()),
                "kl_teacher_student": float((t_p * (t_logp - s_logp)).sum(1).mean()),
                "student_accuracy": s_acc,
                "teacher_accuracy": t_acc,
                "accuracy_retention": s_acc / max(t_acc, 1e-12),
                "compression_ratio": t.param_count / max(s.param_count, 1),
                "size_ratio": t.size_bytes / max(s.size_bytes, 1),
                "speedup": t_lat / max(s_lat, 1e-12),
                "student_latency_ms_p50": s_lat,
                "teacher_latency_ms_p50": t_lat,
            }
            client = MlflowClient()
            client.log_batch(run_id, metrics=_metric_entities(metrics))
            client.set_tag(run_id, "kd_ops.teacher_model_uri", teacher_uri)
            client.log_text(run_id, json.dumps(metrics, indent=2), "distillation_eval.json")
        return EvaluationResult(metrics=metrics, artifacts={}, run_id=run_id)


def _log_probs(out: Any):
    """Logits or probabilities -> log-probabilities, row-normalised (a model may give either)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    if out.min() >= 0 and np.allclose(out.sum(1), 1, atol=1e-4):  # probabilities
        return np.log(np.clip(out, 1e-12, None))
    shifted = out - out.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _metric_entities(metrics: dict[str, float]):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in metrics.items()]
