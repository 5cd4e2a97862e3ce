"""Installed packages add components by name through entry points (kd_ops.core.plugins).

Two real distributions are built and installed with pip (tests/fixtures/kd_ops_example_plugin and
its `broken/` sibling): into a folder of their own rather than the shared virtual environment, so
no other test (nor another process running the suite) ever sees them. Entry points and the
registries are per process, so everything that needs the plugins runs in a process of its own with
that folder on its path: a fork of one interpreter (`plugins`) that has imported kd-ops, torch and
MLflow once but has not looked for a plugin yet, so each test starts where a fresh interpreter
would, without paying seconds of imports each.
"""

from __future__ import annotations

import json
import os
import re
import select
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


# The interpreter the checks fork from. It imports what they use, then, for each job on stdin (JSON:
# code, cwd, files for stdout and stderr, a timeout), forks; the fork runs the code as `python -c`
# would run it, as __main__, and the parent answers with its exit status. Nothing is imported before
# the fork that looks up a component by name, so no registry has read its entry points yet.
FORK_SERVER = """
import json, os, signal, sys, traceback

import kd_ops.config, kd_ops.data.datasets, kd_ops.distill.losses, kd_ops.distill.strategies
import kd_ops.models.zoo, kd_ops.pipeline.distillation, monitors.alerts

answer = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # whatever this process prints goes to its log, not into the answers
print("ready", file=answer, flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the jobs are the parent's to read
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.chdir(job["cwd"])
            signal.alarm(job["timeout"])  # the default action ends the fork: answered as -14
            exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            status = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                status = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(status)
    _, waited = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(waited)), file=answer, flush=True)
os._exit(0)  # stdin closed: done, without the seconds an orderly interpreter shutdown takes
"""


class Plugins:
    """A process that sees the installed plugins; `run` runs code in a fork of it, like `python -c`."""

    def __init__(self, site: Path, folder: Path):
        self.folder, self.jobs = folder, 0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        self.log = folder / "server.err"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", FORK_SERVER], cwd=folder, env=env, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        assert self._answer(300) == "ready"

    def _answer(self, timeout: float) -> str:
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if not line:
            self.close()
            pytest.fail(f"the plugins' interpreter did not answer: {self.log.read_text()[-5000:]}")
        return line.strip()

    def run(self, code: str, cwd: Path, timeout: int = 300) -> str:
        """Run `code` in a fork that sees the installed plugins; its stdout."""
        self.jobs += 1
        out, err = self.folder / f"{self.jobs}.out", self.folder / f"{self.jobs}.err"
        job = {"code": textwrap.dedent(code), "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps({**job, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        status = int(self._answer(timeout + 60))
        assert status == 0, f"exit status {status}:\n{out.read_text()}{err.read_text()[-5000:]}"
        return out.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def plugins(site, tmp_path_factory):
    server = Plugins(site, tmp_path_factory.mktemp("plugin-runs"))
    yield server
    server.close()


def config_errors(plugins: Plugins, tmp_path: Path, *raws: dict) -> list[str]:
    """The ConfigError `load_config` raises for each config, with the plugins installed (one process)."""
    paths = []
    for i, raw in enumerate(raws):
        paths.append(str(tmp_path / f"bad{i}.yaml"))
        Path(paths[-1]).write_text(yaml.safe_dump(raw))
    out = plugins.run(
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
def test_a_config_names_installed_components_like_built_ins(plugins, tmp_path):
    path = tmp_path / "moons.yaml"
    path.write_text(yaml.safe_dump(moons_raw(tmp_path)))
    out = plugins.run(
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


def test_an_installed_alert_hook_is_named_in_the_monitor_config(plugins, tmp_path):
    sink = tmp_path / "alerts.jsonl"
    plugins.run(
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


def test_a_built_in_config_imports_no_plugin(plugins, tmp_path):
    plugins.run(
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


def test_an_unknown_name_lists_the_plugins_and_the_refused_ones(plugins, tmp_path):
    message, method = config_errors(
        plugins,
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


def test_a_broken_plugin_is_one_clear_config_error(plugins, tmp_path):
    got = config_errors(plugins, tmp_path, *(moons_raw(tmp_path, **sections) for sections, _ in BROKEN_CASES.values()))
    for i, ((case, (sections, expected)), message) in enumerate(zip(BROKEN_CASES.items(), got)):
        key, name = _named(sections)
        assert message == f"invalid config {tmp_path / f'bad{i}.yaml'}:\n  {key} = {name!r}: {expected}", case


def test_a_broken_alert_hook_names_its_distribution(plugins, tmp_path):
    out = plugins.run(
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


def test_a_plugin_never_replaces_a_built_in(plugins, tmp_path):
    out = plugins.run(
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
