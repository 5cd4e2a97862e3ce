"""What a flow run shows in the Prefect UI: its name, its artifacts, and kd-ops' own log lines.

Why: a platform team watches its Prefect UI, not kd-ops' terminal. A flow run named
"kd-ops-redistill/sincere-otter" that says "This run didn't generate logs" tells them nothing;
"redistill churn v3 -> v4: promoted", with the gates in a table and links to the MLflow runs and
the Evidently report, tells them what happened without opening anything else.

  names       `distill_run_name` and the others are Prefect `flow_run_name` callables: a name from
              the parameters when the run starts (the model, the trigger); `rename` adds the outcome
              when it ends (version, verdict, promoted or kept)
  artifacts   Prefect markdown and table artifacts (`prefect.artifacts`), one key per model and
              flow (`distill-<model>`), so the Artifacts page keeps each model's history
  logs        `run_logs()`: the `kd_ops` and `monitors` loggers at INFO into the flow run's logs
              through Prefect's own API log handler, for the run's duration (what Prefect's
              PREFECT_LOGGING_EXTRA_LOGGERS does for a whole process; outside a run that handler
              warns on every line), with passwords in URLs masked

Links go to the MLflow UI at the tracking server when `tracking.uri` is one, else where
`mlflow ui` serves a local store (http://127.0.0.1:5000), and to the Evidently UI at
`monitor.workspace_url`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from kd_ops.config.experiment import ExperimentConfig

KD_OPS_LOGGERS = ("kd_ops", "monitors")
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
# The columns of the metrics table, when the roles have them, in this order
TABLE_METRICS = (
    "test_accuracy",
    "test_f1_macro",
    "test_roc_auc",
    "test_nll",
    "test_ece",
    "agreement",
    "retention",
    "compression",
    "speedup",
    "train_time_s",
)
_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*):[^/\s@]+@")


# -- names --------------------------------------------------------------------------------------------
def _model_of(parameters: dict[str, Any]) -> str:
    from flows.common import config

    try:
        return config(parameters["config_path"], parameters.get("overrides")).registry.name
    except Exception:  # noqa: BLE001 - a bad config fails in the run itself, with its own message
        return "(config not readable)"


def _parameters() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters)


def distill_run_name() -> str:
    return f"distill {_model_of(_parameters())}"


def monitor_run_name() -> str:
    return f"monitor {_model_of(_parameters())}"


def redistill_run_name() -> str:
    parameters = _parameters()
    trigger = str(parameters.get("trigger") or "manual")
    return f"redistill {_model_of(parameters)} ({_short(trigger, 60)})"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rename(name: str) -> None:
    """Give the current flow run its final name (the outcome is known only at its end)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=_short(name, 200))


# -- links --------------------------------------------------------------------------------------------
def mlflow_ui(cfg: ExperimentConfig) -> str:
    uri = cfg.tracking.uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI


def run_link(cfg: ExperimentConfig, run_id: str | None, experiment_id: str | None = None) -> str:
    """A markdown link to an MLflow run (its experiment looked up when not given)."""
    if not run_id:
        return "-"
    if experiment_id is None:
        experiment_id = _experiment_of(cfg, run_id)
    return f"[{run_id[:8]}]({mlflow_ui(cfg)}/#/experiments/{experiment_id}/runs/{run_id})"


def version_link(cfg: ExperimentConfig, name: str, version: str | None) -> str:
    if not version:
        return "-"
    return f"[{name} v{version}]({mlflow_ui(cfg)}/#/models/{quote(name, safe='')}/versions/{version})"


def _key(kind: str, model: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{kind}-{model}".lower())).strip("-")[:100]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _gates_table(gates: list[dict[str, Any]]) -> str:
    if not gates:
        return "_no gates configured_\n"
    rows = ["| gate | value | threshold | result |", "| --- | --- | --- | --- |"]
    for g in gates:
        verdict = "pass" if g["passed"] else "**FAIL**"
        note = f" ({g['note']})" if g.get("note") else ""
        rows.append(f"| {g['gate']} | {_fmt(g['value'])} | {g['op']} {_fmt(g['threshold'])} | {verdict}{note} |")
    return "\n".join(rows) + "\n"


# -- artifacts ----------------------------------------------------------------------------------------
def distill_artifacts(cfg: ExperimentConfig, out: dict[str, Any]) -> str:
    """The metrics of teacher, baseline and student side by side (a table artifact, each row
    linking its MLflow run) and the registration and gates (markdown). Returns the run's name."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    reg, runs = out["registered"], out["runs"]
    experiment_id = _experiment_of(cfg, runs.get("parent"))
    roles = [r for r in ("teacher", "baseline", "student") if r in out]
    columns = [m for m in TABLE_METRICS if any(m in out[r] for r in roles)]
    table = [
        {"role": r, **{m: out[r].get(m) for m in columns}, "mlflow run": run_link(cfg, runs.get(r), experiment_id)}
        for r in roles
    ]
    key = _key("distill", reg["name"])
    create_table_artifact(table, key=f"{key}-metrics", description=f"{reg['name']} v{reg['version']}: test split")
    promoted = reg.get("promoted")
    outcome = "promoted to champion" if promoted else "not promoted" if promoted is False else "promotion off"
    lines = [
        f"# distill {reg['name']}: v{reg['version']} {outcome}",
        "",
        f"- registered: {version_link(cfg, reg['name'], reg['version'])} as `@{reg.get('alias')}`",
        f"- champion now: {version_link(cfg, reg['name'], reg.get('champion'))}",
        f"- MLflow: parent run {run_link(cfg, runs.get('parent'), experiment_id)}, "
        + ", ".join(f"{r} {run_link(cfg, runs.get(r), experiment_id)}" for r in roles),
        "",
        "## Gates",
        "",
        _gates_table(out.get("gates") or []),
    ]
    create_markdown_artifact("\n".join(lines), key=key, description=f"{reg['name']} v{reg['version']}")
    return f"distill {reg['name']} v{reg['version']}: {outcome}"


def _experiment_of(cfg: ExperimentConfig, run_id: str | None) -> str | None:
    if not run_id:
        return None
    import mlflow

    return mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id).info.experiment_id


def monitor_artifacts(cfg: ExperimentConfig, result: dict[str, Any]) -> str:
    """The verdict, its reasons and what was not judged (markdown, with links to the Evidently
    reports and the MLflow run), and the window's metrics (table). Returns the run's name."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    name, version, status = result["model_name"], result.get("model_version") or "?", result["status"]
    key = _key("monitor", name)
    window = result.get("window") or {}
    evidently = result.get("evidently") or {}
    lines = [
        f"# monitor {name} v{version}: {status}",
        "",
        f"- window: {window.get('rows', 0)} rows, {window.get('labelled_rows', 0)} with feedback labels,"
        f" {window.get('shadow_rows', 0)} scored by the shadow teacher; {window.get('first')} to {window.get('last')}",
        f"- MLflow: monitor run {run_link(cfg, result.get('run_id'))}" if result.get("run_id") else "- not recorded",
    ]
    if evidently.get("dashboard"):
        lines.append(
            f"- Evidently: [dashboard]({evidently['dashboard']}), reports: "
            + ", ".join(f"[{kind}]({link})" for kind, link in evidently.get("links", {}).items() if link)
        )
    if result.get("event_id"):
        lines.append(
            f"- emitted `kd-ops.monitor.alert` (event {result['event_id']}): the redistill deployment acts on it"
        )
    lines += ["", "## Reasons", ""]
    lines += [f"- **{r['status']}** {r['message']}" for r in result.get("reasons", [])] or ["_none_"]
    if result.get("skipped"):
        lines += ["", "## Not judged", "", *(f"- {s}" for s in result["skipped"][:30])]
    create_markdown_artifact("\n".join(lines), key=key, description=f"{name} v{version}: {status}")
    metrics = result.get("metrics") or {}
    if metrics:
        shown = sorted(k for k in metrics if not k.endswith("_p_value") and not k.startswith("drift_p_value_"))
        create_table_artifact(
            [{"metric": k, "value": metrics[k], "p_value": metrics.get(f"{k}_p_value")} for k in shown],
            key=f"{key}-metrics",
            description=f"{name} v{version}: window metrics",
        )
    return f"monitor {name} v{version}: {status}"


def redistill_artifacts(cfg: ExperimentConfig, out: dict[str, Any], trigger: str) -> str:
    """Rows the new student learned from, its gates and the promotion decision. Returns the run's name."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    name = out.get("model_name") or cfg.registry.name
    key = _key("redistill", name)
    if out.get("skipped"):
        create_markdown_artifact(
            f"# redistill {name}: skipped\n\n{out['reason']}\n\n- trigger: {trigger}", key=key, description="skipped"
        )
        return f"redistill {name}: skipped (cooldown)"
    before, candidate = out.get("champion_before"), out.get("candidate_version")
    if out.get("promoted"):
        decision = f"v{candidate} promoted over v{before}"
    else:
        decision = f"v{candidate} not promoted, v{before} stays champion"
    lines = [
        f"# redistill {name}: {decision}",
        "",
        f"- trigger: {trigger}",
        f"- decision: {out.get('reason')}",
        f"- candidate: {version_link(cfg, name, candidate)};"
        f" champion now {version_link(cfg, name, out.get('champion_after'))}",
        f"- MLflow: distillation run {run_link(cfg, out.get('run_id'))}",
        "",
        "## Rows",
        "",
        "| rows | count |",
        "| --- | --- |",
        *(f"| {k.replace('_', ' ')} | {v} |" for k, v in (out.get("rows") or {}).items()),
        "",
        "## Gates",
        "",
        _gates_table(out.get("gates") or []),
    ]
    create_markdown_artifact("\n".join(lines), key=key, description=f"{name}: {decision}")
    accuracy = out.get("accuracy") or {}
    if accuracy:
        create_table_artifact(
            [{"rows": where, **scores} for where, scores in accuracy.items()],
            key=f"{key}-accuracy",
            description="accuracy of champion and candidate on the held-out recent rows and on the reference",
        )
    return f"redistill {name}: {decision}"


# -- logs ---------------------------------------------------------------------------------------------
class _MaskPasswords(logging.Filter):
    """A URL's password never reaches the Prefect API (`postgresql://user:***@host`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _PASSWORD.sub(r"\g<scheme>\g<user>:***@", message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


@contextlib.contextmanager
def run_logs() -> Iterator[None]:
    """Within a flow run: kd-ops' INFO lines (stage summaries, gate decisions, the verdict,
    warnings) also go to the run's logs in the Prefect UI."""
    from prefect.logging.handlers import APILogHandler

    handler = APILogHandler(level=logging.INFO)
    handler.addFilter(_MaskPasswords())
    loggers = [logging.getLogger(n) for n in KD_OPS_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
