"""Config section `monitor`: windows, thresholds, significance, alert hooks, the monitor's schedule."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kd_ops.config.base import _Section, check_cron


class WebhookHook(_Section):
    """POST the alert as JSON (or a Slack-compatible body); optionally signed with HMAC-SHA256."""

    type: Literal["webhook"] = "webhook"
    url: str | None = Field(None, description="http(s) URL to POST to")
    url_env: str | None = Field(None, description="environment variable holding the URL (a Slack URL is a secret)")
    format: Literal["json", "slack"] = "json"
    secret_env: str | None = Field(None, description="environment variable holding the HMAC key")
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=10, description="further attempts after a connection error, 429 or 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first wait between attempts; doubles each time")

    @model_validator(mode="after")
    def _one_url(self) -> "WebhookHook":
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url = {self.url!r}: must start with http:// or https://")
        return self


class CommandHook(_Section):
    """Run a command (no shell) with the alert as JSON on stdin."""

    type: Literal["command"] = "command"
    command: list[str] = Field(min_length=1)
    timeout_s: float = Field(30.0, gt=0)


class EntryPointHook(_Section):
    """A hook an installed package registers in the entry-point group `kd_ops.alert_hooks`."""

    type: Literal["entry_point"] = "entry_point"
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


HookConfig = Annotated[WebhookHook | CommandHook | EntryPointHook, Field(discriminator="type")]


class AlertsConfig(_Section):
    hooks: list[HookConfig] = Field(default_factory=list)
    notify_on: Literal["alert", "warn"] = Field("alert", description="lowest status that is sent")
    cooldown_minutes: float = Field(
        60.0, ge=0, description="the same reason for the same model is sent at most once per cooldown"
    )
    state_file: str = Field(".kd-ops/alert-state.json", description="when each (model, reason) was last sent")


class Threshold(_Section):
    """A signal is `warn` past `warn` and `alert` past `alert` (both in the signal's own units)."""

    warn: float
    alert: float

    @model_validator(mode="after")
    def _ordered(self) -> "Threshold":
        if self.alert < self.warn:
            raise ValueError(f"alert ({self.alert}) must be at least warn ({self.warn})")
        return self


def _threshold(warn: float, alert: float, what: str) -> Any:
    return Field(default_factory=lambda: Threshold(warn=warn, alert=alert), description=what)


class MonitorThresholds(_Section):
    drift_share: Threshold = _threshold(0.3, 0.5, "share of input features whose distribution drifted")
    # PSI's usual bands: under 0.1 no change, 0.1-0.2 moderate, over 0.2 significant
    prediction_drift: Threshold = _threshold(0.1, 0.2, "PSI of the predicted class against the reference")
    confidence_drift: Threshold = _threshold(0.99, 0.999, "1 - p-value of the confidence drift test")
    slice_drift: Threshold = _threshold(0.1, 0.2, "PSI of the share of traffic per input slice, worst slice")
    accuracy_drop: Threshold = _threshold(0.03, 0.06, "reference accuracy minus accuracy on labelled rows")
    slice_accuracy_drop: Threshold = _threshold(0.06, 0.12, "the same, worst slice")
    estimated_accuracy_drop: Threshold = _threshold(0.03, 0.06, "reference accuracy minus the label-free estimate")
    agreement_drop: Threshold = _threshold(0.03, 0.06, "reference agreement with the teacher minus the window's")
    # Not a sample statistic: a category the model never saw is encoded as missing, so 5% of rows
    # carrying one is a change upstream (a new code, a renamed value) worth a look, 10% an alert.
    # A classifier two-sample test (Lopez-Paz & Oquab 2017): Evidently's model method trains a
    # classifier to tell the window's embeddings from the reference's; its ROC AUC minus 0.5 on
    # held-out rows is the signal, judged at `rate_p_value` (Mann-Whitney's null of the AUC).
    embedding_drift: Threshold = _threshold(
        0.05,
        0.10,
        "text tables: ROC AUC above 0.5 of a classifier telling the window's embeddings from the reference's",
    )
    unseen_category_share: Threshold = _threshold(
        0.05, 0.10, "tables: share of rows with a category value the training split never held"
    )


class MonitorConfig(_Section):
    store: str = Field("sqlite:///predictions.db", description="the prediction log (a SQLAlchemy URL)")
    window_rows: int | None = Field(1000, ge=1, description="judge the latest N predictions of the served version")
    window_minutes: float | None = Field(None, gt=0, description="or: the predictions of the last M minutes")
    label_window_rows: int | None = Field(
        None,
        ge=1,
        description="labels arrive late: judge accuracy on the labelled rows among the latest N predictions of the"
        " served version (at least the window; default: the window itself); drift and the label-free estimates"
        " stay on the window",
    )
    min_rows: int = Field(200, ge=1, description="fewer rows in the window: status 'insufficient', no verdict")
    min_labelled_rows: int = Field(100, ge=1, description="fewer labelled rows: accuracy is not judged")
    min_slice_rows: int = Field(30, ge=1, description="fewer rows in a slice: that slice is not judged")
    drift_p_value: float = Field(0.05, gt=0, lt=1, description="per-feature drift test level")
    embedding_drift: bool = Field(
        True,
        description="tables with text: compare the served network's embeddings (the input of its head) of the"
        " window and the reference rows (Evidently's EmbeddingsDrift; the monitor loads the served model for it)",
    )
    rate_p_value: float = Field(
        0.001,
        gt=0,
        lt=1,
        description="a drop in accuracy or agreement counts only below this one-sided p-value (about 3 sigma)",
    )
    thresholds: MonitorThresholds = Field(default_factory=MonitorThresholds)
    workspace: str | None = Field(
        ".kd-ops/evidently",
        description="Evidently workspace for the report history and dashboard: a folder, or an Evidently UI"
        " server's URL",
    )
    workspace_url: str | None = Field(
        "http://127.0.0.1:8000",
        description="where users open `evidently ui` over a workspace folder: links in monitor results and"
        " Prefect artifacts",
    )
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    # When `kd-ops deploy` runs the monitor: a cron string, or every `interval_minutes`
    cron: str | None = Field(None, description="monitor deployment schedule (cron, e.g. '*/15 * * * *')")
    interval_minutes: float | None = Field(10, gt=0, description="or: run the monitor every M minutes")

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str | None) -> str | None:
        return check_cron(v)
