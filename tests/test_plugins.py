"""Installed packages add components by name through entry points (kd_ops.core.plugins).

Two real distributions are built and installed with pip (tests/fixtures/kd_ops_example_plugin and
its `broken/` sibling): into a folder of their own rather than the shared virtual environment, so
no other test (nor another process running the suite) ever sees them. Entry points and the
registries are per process, so everything that needs the plugins runs in a fresh interpreter with
that folder on its path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "kd_ops_example_plugin"
BROKEN = "kd-ops-broken-plugin 0.1.0"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Both fixture distributions, built and installed by pip (offline) into their own folder."""
    tmp = tmp_path_factory.mktemp("plugins")
    src = tmp / "src"
    shutil.copytree(FIXTURE, src)  # the build writes build/ and *.egg-info next to the sources
    target = tmp / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(src), str(src / "broken")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"kd_ops_example_plugin", "kd_ops_broken_plugin"} <= {p.name for p in target.iterdir()}
    return target


def run_python(site: Path, code: str, cwd: Path, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter that sees the installed plugins; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    return proc.stdout


def config_errors(site: Path, tmp_path: Path, *raws: dict) -> list[str]:
    """The ConfigError `load_config` raises for each config, with the plugins installed (one process)."""
    paths = []
    for i, raw in enumerate(raws):
        paths.append(str(tmp_path / f"bad{i}.yaml"))
        Path(paths[-1]).write_text(yaml.safe_dump(raw))
    out = run_python(
        site,
        f"""
        import json
        from kd_ops.config import load_config
        from kd_ops.core.errors import ConfigError
        messages = []
        for path in {paths!r}:
            try:
                load_config(path)
            except ConfigError as err:
                messages.append(str(err))
            else:
                raise SystemExit(f"no ConfigError for {{path}}")
        print(json.dumps(messages))
        """,
        tmp_path,
    )
    return json.loads(out.strip().splitlines()[-1])


def moons_raw(tmp_path: Path, **sections) -> dict:
    raw = {
        "seed": 0,
        "data": {"name": "example_moons", "batch_size": 64},
        "teacher": {"model": "mlp", "params": {"hidden": [16]}, "epochs": 2},
        "student": {"model": "tiny_mlp", "params": {"hidden": 8}, "epochs": 2},
        "distill": {
            "method": "kd",
            "losses": [{"name": "logit_l1", "weight": 0.5}],
            "cache": {"dir": str(tmp_path / "cache")},
        },
        "train": {"progress_bar": False},
        "evaluation": {
            "latency_repeats": 5,
            "throughput_repeats": 2,
            "throughput_batch": 32,
            "throughput_batches": [1, 32],
            "robustness": False,  # the corruptions are those of images (kd_ops.data.corruptions)
        },
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "plugins"},
        "registry": {"name": "moons-student"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.mark.slow
def test_a_config_names_installed_components_like_built_ins(site, tmp_path):
    path = tmp_path / "moons.yaml"
    path.write_text(yaml.safe_dump(moons_raw(tmp_path)))
    out = run_python(
        site,
        f"""
        import json
        from kd_ops.config import load_config
        from kd_ops.pipeline.distillation import run_distillation

        result = run_distillation(load_config({str(path)!r}))
        print(json.dumps(result.to_json()))
        """,
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["registered"]["name"] == "moons-student"
    assert 0.5 < result["student"]["test_accuracy"] <= 1.0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    student = client.get_run(result["runs"]["student"]).data.params
    assert student["model"] == "tiny_mlp" and student["loss.0"] == "logit_l1*0.5", student


def test_an_installed_alert_hook_is_named_in_the_monitor_config(site, tmp_path):
    sink = tmp_path / "alerts.jsonl"
    run_python(
        site,
        f"""
        from kd_ops.config.monitoring import AlertsConfig
        from monitors.alerts import Alert, Dispatcher, Reason

        hooks = [{{"type": "entry_point", "name": "jsonl_file", "params": {{"path": {str(sink)!r}}}}}]
        cfg = AlertsConfig.model_validate({{"hooks": hooks, "state_file": {str(tmp_path / "state.json")!r}}})
        reason = Reason("share_of_drifted_features", "alert", 0.6, 0.5, "60% of features drifted")
        out = Dispatcher(cfg).dispatch(Alert("moons-student", "1", "alert", (reason,)))
        assert out.sent == ["jsonl_file({sink})"], out
        """,
        ROOT,
    )
    assert json.loads(sink.read_text())["model_name"] == "moons-student"


def test_a_built_in_config_imports_no_plugin(site, tmp_path):
    run_python(
        site,
        """
        import sys
        import kd_ops
        from kd_ops.config import config_from_dict

        raw = {"data": {"name": "digits"}, "teacher": {"model": "cnn"}, "student": {"model": "mlp"},
               "distill": {"method": "dkd", "losses": [{"name": "kd"}]}}
        config_from_dict(raw)
        from kd_ops.data.datasets import DATASETS
        from kd_ops.distill.losses import LOSSES
        from kd_ops.distill.strategies import STRATEGIES
        from kd_ops.models.zoo import MODELS

        plugins = sorted(m for m in sys.modules if m.startswith(("kd_ops_example_plugin", "kd_ops_broken_plugin")))
        assert not plugins, plugins
        assert not any(r.plugins_loaded for r in (DATASETS, MODELS, LOSSES, STRATEGIES))
        # the first name kd-ops does not hold loads that kind's entry points, and only what they name
        assert "example_moons" in DATASETS
        assert "kd_ops_example_plugin.data" in sys.modules and "kd_ops_example_plugin.models" not in sys.modules
        """,
        tmp_path,
    )


def test_an_unknown_name_lists_the_plugins_and_the_refused_ones(site, tmp_path):
    message, method = config_errors(
        site,
        tmp_path,
        moons_raw(tmp_path, data={"name": "moonz"}, student={"model": "tiny"}),
        moons_raw(tmp_path, distill={"method": "logit_l2"}),
    )
    known = re.search(r"data\.name = 'moonz': unknown dataset 'moonz'; known: ([^;]+);", message)
    assert known and {"example_moons", "digits"} <= set(known[1].split(", ")), message
    assert "student.model = 'tiny': unknown model 'tiny'; known: " in message and "tiny_mlp" in message
    assert (
        f"dataset plugin 'ghost_data' refused: entry point `ghost_data = kd_ops_broken_plugin.missing` "
        f"in group kd_ops.datasets of distribution {BROKEN}: failed to import: ModuleNotFoundError" in message
    )
    assert "unknown method" in method and "logit_l1" in method.split("known: ")[1].split(", ")


BROKEN_CASES = {  # what a config names -> the refusal, which the config error gives under the key
    "missing module": (
        {"data": {"name": "ghost_data"}},
        f"dataset plugin 'ghost_data' refused: entry point `ghost_data = kd_ops_broken_plugin.missing` in group "
        f"kd_ops.datasets of distribution {BROKEN}: failed to import: ModuleNotFoundError: "
        "No module named 'kd_ops_broken_plugin.missing'",
    ),
    "registers another name": (
        {"student": {"model": "misnamed", "params": {}}},
        f"model plugin 'misnamed' refused: entry point `misnamed = kd_ops_broken_plugin.misnamed` in group "
        f"kd_ops.models of distribution {BROKEN}: importing it registered no model named 'misnamed' "
        "(it registered 'not_misnamed'); register it under the entry point's name",
    ),
    "a name no entry point declares": (
        {"student": {"model": "not_misnamed", "params": {}}},
        f"model plugin 'not_misnamed' refused: distribution {BROKEN}: it registered model 'not_misnamed', "
        "a name no entry point of group kd_ops.models declares",
    ),
    "fails on import": (
        {"distill": {"method": "crashing"}},
        f"strategy plugin 'crashing' refused: entry point `crashing = kd_ops_broken_plugin.crash` in group "
        f"kd_ops.strategies of distribution {BROKEN}: failed to import: RuntimeError: this plugin is broken on purpose",
    ),
}


def _named(sections: dict) -> tuple[str, str]:
    """The config key a case names, and the name: `student.model`, 'misnamed'."""
    (section, values), = sections.items()
    key = next(k for k in ("name", "model", "method") if k in values)
    return f"{section}.{key}", values[key]


def test_a_broken_plugin_is_one_clear_config_error(site, tmp_path):
    got = config_errors(site, tmp_path, *(moons_raw(tmp_path, **sections) for sections, _ in BROKEN_CASES.values()))
    for i, ((case, (sections, expected)), message) in enumerate(zip(BROKEN_CASES.items(), got)):
        key, name = _named(sections)
        assert message == f"invalid config {tmp_path / f'bad{i}.yaml'}:\n  {key} = {name!r}: {expected}", case


def test_a_broken_alert_hook_names_its_distribution(site, tmp_path):
    out = run_python(
        site,
        """
        from kd_ops.config.monitoring import AlertsConfig
        from kd_ops.core.errors import ConfigError
        from monitors.alerts import build_hooks

        try:
            build_hooks(AlertsConfig.model_validate({"hooks": [{"type": "entry_point", "name": "ghost_hook"}]}))
        except ConfigError as err:
            print(err)
        """,
        ROOT,
    )
    assert out.strip() == (
        f"monitor.alerts entry_point 'ghost_hook': entry point `ghost_hook = kd_ops_broken_plugin.missing:Hook` "
        f"in group kd_ops.alert_hooks of distribution {BROKEN}: failed to import: ModuleNotFoundError: "
        "No module named 'kd_ops_broken_plugin.missing'"
    )


def test_a_plugin_never_replaces_a_built_in(site, tmp_path):
    out = run_python(
        site,
        """
        import sys
        from kd_ops.distill.losses import LOSSES
        from kd_ops.distill.losses.kd import KD

        assert "zzz" not in LOSSES  # a miss: the kd_ops.losses entry points are loaded now
        assert LOSSES.plugins_loaded and LOSSES.get("kd") is KD
        assert "kd_ops_broken_plugin.steal" not in sys.modules  # refused by name, never imported
        print(LOSSES.plugin_errors["kd"])
        """,
        tmp_path,
    )
    assert out.strip() == (
        f"loss plugin 'kd' refused: entry point `kd = kd_ops_broken_plugin.steal` in group kd_ops.losses of "
        f"distribution {BROKEN}: loss 'kd' is built in (or registered by your code); a plugin never replaces it"
    )


def test_the_documented_entry_points_are_the_fixtures():
    """docs/extending.md shows the fixture's entry points as they stand in its pyproject.toml."""
    page = (ROOT / "docs" / "extending.md").read_text()
    marker = "<!-- output of: tests/test_plugins.py::test_the_documented_entry_points_are_the_fixtures -->"
    block = page.split(marker, 1)[1].split("```text\n", 1)[1].split("\n```", 1)[0]
    assert "[project.entry-points." in block and block in (FIXTURE / "pyproject.toml").read_text()
    data = (FIXTURE / "kd_ops_example_plugin" / "data.py").read_text()
    assert f"```python\n{data}```" in page, "docs/extending.md shows the example's data.py as it stands"
