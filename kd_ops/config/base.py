"""What every config section shares: unknown keys are errors, and the checks used by several sections."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


GATE_PREFIXES = ("min_", "max_")


def check_cron(v: str | None) -> str | None:
    """Five fields; Prefect checks the rest when `kd-ops deploy` builds the schedule (importing it
    here would slow every command by a second)."""
    if v is not None and len(v.split()) != 5:
        raise ValueError(f"{v!r} is not a cron string of five fields (minute hour day month weekday)")
    return v


def check_gate_keys(gates: dict[str, float]) -> dict[str, float]:
    """Gate keys are `min_<metric>` or `max_<metric>`; whether the metric exists is checked in
    `kd_ops.catalog` (it needs the evaluation module)."""
    for key in gates:
        if not key.startswith(GATE_PREFIXES) or len(key) <= 4:
            raise ValueError(f"gates.{key}: a gate is min_<metric> or max_<metric>, e.g. min_accuracy_retention: 0.95")
    return gates
