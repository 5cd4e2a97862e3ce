"""Config sections `tracking` (where MLflow runs go) and `registry` (where the student is registered)."""

from __future__ import annotations

from pydantic import Field, model_validator

from kd_ops.config.base import _Section


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "kd-ops"


class RegistryConfig(_Section):
    name: str = Field("kd-ops-student", min_length=1)
    alias: str = "challenger"
    promote: bool = Field(True, description="make the new version `champion` when every gate passes")

    @model_validator(mode="after")
    def _alias_not_reserved(self) -> "RegistryConfig":
        if self.alias in ("champion", "previous"):
            raise ValueError(
                f"registry.alias = {self.alias!r}: 'champion' and 'previous' are set only by promotion "
                "(gates) and rollback; a new version is registered under another alias, e.g. 'challenger'"
            )
        return self
