"""Config section `redistill`: re-distillation on recent traffic after drift, and what it must beat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kd_ops.config.base import _Section, check_cron


class RedistillConfig(_Section):
    """Re-distillation after drift: the transfer set is the training data plus recent production
    inputs labelled by the teacher (feedback labels win where they exist); the new student must
    beat the champion on recent rows it did not train on and hold its accuracy on the reference."""

    production_rows: int = Field(2000, ge=10, description="the latest N logged predictions of the model")
    holdout_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of those rows kept out of training to gate on (recent data)"
    )
    min_recent_gain: float = Field(
        0.0, description="new student's accuracy minus the champion's on the recent holdout must be at least this"
    )
    max_reference_drop: float = Field(
        0.02, ge=0, description="champion's accuracy minus the new student's on the reference, at most this"
    )
    teacher: Literal["keep", "refit"] = Field(
        "keep",
        description="keep: the champion's teacher labels the recent rows; refit: the teacher's recipe is first"
        " refitted on its training split plus the recent rows whose feedback labels arrived (registered as"
        " `<registry.name>-teacher`, the new version's teacher in its lineage)",
    )
    cron: str | None = Field("0 3 * * 0", description="scheduled re-distillation (weekly by default); null: none")
    on_alert: bool = Field(True, description="start a re-distillation when the monitor raises an alert")
    cooldown_minutes: float = Field(60, ge=0, description="alerts within this time after one start nothing more")

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str | None) -> str | None:
        return check_cron(v)


class ReplayConfig(_Section):
    """`kd-ops replay` (and `kd-ops demo` on a config that has `replay.start`): the table's later
    rows sent as traffic, window by window, with feedback labels that arrive late and for a share
    of the predictions. Flags of `kd-ops replay` override these."""

    start: str | None = Field(None, description="first window (e.g. 2013-04); rows before it are the past")
    end: str | None = Field(None, description="last window, inclusive (e.g. 2013-12)")
    window: Literal["month", "week", "day"] = Field("month", description="window length")
    label_share: float = Field(0.2, ge=0, le=1, description="share of predictions whose true label arrives")
    label_delay: int = Field(1, ge=0, description="windows until a label arrives (0: at the window's end)")
    rows_per_window: int | None = Field(
        None, ge=1, description="send this many rows of each window (a random draw, in time order); null: all"
    )
