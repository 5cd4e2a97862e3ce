"""One churn distillation for the session, shared by the tests of a table model's life after
training: serving it (tests/serving/test_serve_table.py), monitoring its traffic
(tests/monitors/test_monitor_tables.py) and re-distilling it (tests/pipeline/test_redistill_tables.py).

Training it once instead of once per module is the point; what each module may do to it:
- the version itself (its files, tags, reference) is read only, by every module;
- the monitor's runs go to experiments of their own, its windows to stores of its own;
- re-distillation registers new versions under the same name and may move @champion to one of
  them, so a module that needs @champion on this version sets it itself (serving, re-distillation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHURN_NAME = "churn-tables"


@dataclass(frozen=True)
class ChurnChampion:
    raw: dict  # its config, as a dict (churn_raw)
    root: Path  # its folder: the teacher-output cache
    result: Any  # kd_ops.pipeline.distillation.DistillResult
    name: str
    version: str
    tracking_uri: str

    def pin_champion(self) -> None:
        """@champion on this version, whatever the gates (or an earlier re-distillation) said."""
        from kd_ops.registry.tracking import open_tracking

        open_tracking(self.tracking_uri).set_registered_model_alias(self.name, "champion", self.version)


@pytest.fixture(scope="session")
def churn_champion(tmp_path_factory, tracking_uri) -> ChurnChampion:
    """A churn student (LightGBM teacher, MLP student, 1,500 rows: `churn_raw`), registered as a
    kd-ops table model, CHURN_NAME v1, in the session's MLflow."""
    from kd_ops.config.loading import config_from_dict
    from kd_ops.pipeline.distillation import run_distillation

    from .conftest import churn_raw

    root = tmp_path_factory.mktemp("churn-champion")
    raw = churn_raw(tracking_uri, root, CHURN_NAME, "tables", monitor={"workspace": None})
    result = run_distillation(config_from_dict(raw, "churn"))
    return ChurnChampion(raw, root, result, CHURN_NAME, result.registered["version"], tracking_uri)
