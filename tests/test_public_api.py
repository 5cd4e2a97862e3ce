"""`from kd_ops import ...` is the public API: every name resolves, and importing the package stays
fast because nothing heavy is imported until a name is used."""

from __future__ import annotations

import subprocess
import sys

import kd_ops


def test_every_public_name_resolves():
    assert {"load_config", "run_distillation", "evaluate_model", "promote", "rollback", "serve"} <= set(kd_ops.__all__)
    for name in kd_ops.__all__:
        assert getattr(kd_ops, name) is not None, name
    assert set(dir(kd_ops)) == set(kd_ops.__all__)


def test_importing_kd_ops_imports_nothing_heavy():
    code = (
        "import sys, kd_ops; heavy = [m for m in ('torch', 'lightning', 'mlflow', 'prefect', 'evidently', 'pandas')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kd_ops.nope  # noqa: B018
