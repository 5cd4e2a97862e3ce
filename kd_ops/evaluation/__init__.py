"""Evaluation: the metrics every role logs (`metrics`), `evaluate_model` behind `kd-ops evaluate`
(`evaluate`), edge exports (`edge`), plots, the monitoring reference stored with each student
(`reference`) and the MLflow evaluator plugin (`mlflow_evaluator`)."""
