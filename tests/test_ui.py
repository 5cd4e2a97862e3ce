"""What a user sees, in a real browser: headless Chromium (Debian's package, driven by Playwright;
no browser download) against a real MLflow UI, Evidently UI and Prefect UI on 127.0.0.1, over what
a short loop made: distil (Prefect flow) -> clean traffic -> monitor -> drifted traffic -> monitor
(alert) -> redistill (Prefect flow) -> the new champion's traffic -> monitor.

Asserted on the rendered pages, not on the APIs behind them: MLflow's compare view lists teacher,
baseline and student; the version page shows the model card; the Evidently project's dashboard has
kd-ops' panels with points in them; the Prefect flow run of the re-distillation shows its artifact.
Each page is screenshotted into `--screenshots DIR` (`make screenshots` writes docs/img/), else a
temporary folder."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
import yaml

from kd_ops.data.scenarios import sample
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.feedback import feedback_rows
from kd_ops.prediction_log.protocol import prediction_batch
from kd_ops.prediction_log.store import feedback, predictions

from .conftest import tiny_raw
from .servers import ServerProcess, free_port

pytestmark = pytest.mark.slow
NAME = "ui-student"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# MLflow's UI opens its Assistant side panel over a third of the page when it is served from
# localhost; Chromium reaches the server under this name instead (mapped to 127.0.0.1).
MLFLOW_HOST = "mlflow.kd-ops.test"
CHROMIUM_FLAGS = [
    # Without the background-networking flags Chromium keeps dialling out of this closed network.
    *"--no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking".split(),
    *"--disable-component-update --disable-sync --hide-scrollbars".split(),
    f"--host-resolver-rules=MAP {MLFLOW_HOST} 127.0.0.1",
]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "EVIDENTLY_DISABLE_TELEMETRY": "1"}
WAIT_MS = 90_000


@pytest.fixture(scope="module", autouse=True)
def _patient_expect():
    """Pages of servers on a busy 2-core machine: Playwright's 5 s default is too short."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def screenshots(request, tmp_path_factory) -> Path:
    chosen = request.config.getoption("--screenshots")
    out = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` (API and UI) on 127.0.0.1, this process's flows reporting to it."""
    import prefect.settings as ps

    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        root / "server.log",
        env={
            "PREFECT_HOME": str(root),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": None,
            # the UI's own calls: else it looks for the API on the default port, 4200
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(f"{url}/api/health", lambda r: r.ok)
        updates = {ps.PREFECT_API_URL: f"{url}/api", ps.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        with ps.temporary_settings(updates=updates):
            yield url
    finally:
        server.stop()


def _answer(version: str, x: np.ndarray, labels: np.ndarray, store: str, label_share: float = 0.5) -> None:
    """The registered version's answers to `x` in the prediction log, as `kd-ops serve` writes
    them, and feedback labels for a share of them."""
    from kd_ops.models.loading import load_model

    model = load_model(f"models:/{NAME}/{version}")
    with torch.inference_mode():
        probs = torch.softmax(model(torch.as_tensor(x)), 1).numpy()
    log = PredictionLog.open_sync(store)
    try:
        batch = prediction_batch(NAME, version, x, probs, [{}] * len(x))
        log.write(predictions, batch)
        labelled = int(len(x) * label_share)
        log.write(feedback, feedback_rows([(i, int(y)) for i, y in zip(batch["ids"][:labelled], labels[:labelled])]))
    finally:
        log.close()


@pytest.fixture(scope="module")
def short_loop(prefect_server, tmp_path_factory):
    import mlflow

    from flows.distill import distill_flow
    from flows.monitor import monitor_flow
    from flows.redistill import redistill_flow
    from kd_ops.config.loading import load_config
    from kd_ops.data.datamodule import DistillDataModule

    root = tmp_path_factory.mktemp("ui-loop")
    tracking = f"sqlite:///{root}/mlflow.db"
    raw = tiny_raw(
        tracking,
        registry={"name": NAME},
        teacher={"augment": ["shift"], "epochs": 8},
        student={"epochs": 15},
        monitor={
            "store": f"sqlite:///{root}/predictions.db",
            "workspace": str(root / "evidently"),
            "window_rows": 300,
            "min_labelled_rows": 50,
            "alerts": {"state_file": str(root / "alerts.json")},
        },
        # 270 reference rows: a drop of a few rows is noise (the default 0.02 is 5 rows)
        redistill={"production_rows": 300, "max_reference_drop": 0.05},
    )
    config = root / "loop.yaml"
    config.write_text(yaml.safe_dump(raw))
    mlflow.set_tracking_uri(tracking)

    distilled = distill_flow(str(config))
    first = distilled["registered"]["version"]
    assert distilled["registered"]["champion"] == first
    dm = DistillDataModule(load_config(str(config)).data, 0)
    store = raw["monitor"]["store"]
    verdicts = []
    for scenario, seed in (("clean", 1), ("shift", 2)):
        _answer(first, *sample(dm, scenario, 300, seed=seed), store)
        verdicts.append(monitor_flow(str(config))["status"])
    assert verdicts[-1] == "alert"
    state = redistill_flow(str(config), trigger=f"drift alert on v{first}", ignore_cooldown=True, return_state=True)
    redistilled = state.result()
    champion = str(mlflow.MlflowClient(tracking).get_model_version_by_alias(NAME, "champion").version)
    _answer(champion, *sample(dm, "shift", 300, seed=3), store)
    last = monitor_flow(str(config))
    return {
        "root": root,
        "tracking": tracking,
        "distilled": distilled,
        "redistill_run": str(state.state_details.flow_run_id),
        "redistilled": redistilled,
        "champion": champion,
        "project_id": last["evidently"]["project_id"],
        "windows": len(verdicts) + 1,
    }


@pytest.fixture(scope="module")
def uis(short_loop, prefect_server):
    """The MLflow UI (`mlflow server`) and the Evidently UI (`evidently ui`) over what the loop
    made; the Prefect UI is the Prefect server's own."""
    root = short_loop["root"]
    bin_dir = Path(sys.executable).parent
    mlflow_port, evidently_port = free_port(), free_port()
    mlflow_ui = ServerProcess(
        [
            str(bin_dir / "mlflow"),
            "server",
            "--backend-store-uri",
            short_loop["tracking"],
            *f"--host 127.0.0.1 --port {mlflow_port} --workers 1".split(),
            *f"--allowed-hosts {MLFLOW_HOST}:{mlflow_port},127.0.0.1:{mlflow_port}".split(),
            *f"--cors-allowed-origins http://{MLFLOW_HOST}:{mlflow_port}".split(),
        ],
        root / "mlflow-ui.log",
        env=QUIET,
    )
    evidently_ui = ServerProcess(
        [str(bin_dir / "evidently"), "ui", "--workspace", str(root / "evidently")]
        + f"--host 127.0.0.1 --port {evidently_port}".split(),
        root / "evidently-ui.log",
        env=QUIET,
    )
    try:
        mlflow_ui.wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", lambda r: r.text.strip() == "OK")
        evidently_ui.wait_healthy(f"http://127.0.0.1:{evidently_port}/api/version", lambda r: r.ok)
        yield {
            "mlflow": f"http://{MLFLOW_HOST}:{mlflow_port}",
            "evidently": f"http://127.0.0.1:{evidently_port}",
            "prefect": prefect_server,
        }
    finally:
        mlflow_ui.stop()
        evidently_ui.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: `make test` installs Debian's chromium (apt-get)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    yield context.new_page()
    context.close()


def _shoot(page, path: Path) -> None:
    page.wait_for_timeout(1500)  # let charts finish their transitions
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 20_000, f"{path} looks blank"


def test_mlflow_compare_view_lists_teacher_baseline_and_student(uis, short_loop, page, screenshots):
    from playwright.sync_api import expect

    runs = short_loop["distilled"]["runs"]
    ids = json.dumps([runs[r] for r in ("teacher", "baseline", "student")])
    import mlflow

    experiment = mlflow.MlflowClient(short_loop["tracking"]).get_run(runs["student"]).info.experiment_id
    page.set_viewport_size({"width": 1600, "height": 2200})  # MLflow scrolls inside its own pane
    page.goto(f"{uis['mlflow']}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([experiment]))}")
    for role in ("teacher", "baseline", "student"):
        expect(page.get_by_text(role, exact=True).first).to_be_visible()
    expect(page.get_by_text("test_accuracy").first).to_be_visible()
    _shoot(page, screenshots / "mlflow-compare.png")

    # The runs list: the data each run saw, in MLflow's dataset column
    page.set_viewport_size({"width": 1600, "height": 1000})
    page.goto(f"{uis['mlflow']}/#/experiments/{experiment}/runs")
    page.get_by_text("Expand rows", exact=True).click()  # three datasets a row, then "+N"
    for name in ("digits/train", "digits/transfer", "digits/val"):
        expect(page.get_by_text(name, exact=False).first).to_be_visible()
    _shoot(page, screenshots / "mlflow-datasets.png")
    # the newest parent run is the re-distillation's: its other inputs include the production window
    page.get_by_text(re.compile(r"^\+\d+$")).first.click()
    expect(page.get_by_text(f"{NAME}/production window", exact=False).first).to_be_visible()


def test_mlflow_version_page_shows_the_model_card(uis, short_loop, page, screenshots):
    from playwright.sync_api import expect

    version = short_loop["distilled"]["registered"]["version"]
    page.goto(f"{uis['mlflow']}/#/models/{NAME}/versions/{version}")
    expect(page.get_by_role("heading", name=f"{NAME} v{version}")).to_be_visible()
    expect(page.get_by_text("Against the teacher (same test rows)")).to_be_visible()
    expect(page.get_by_text("Keeps", exact=False).first).to_be_visible()
    _shoot(page, screenshots / "mlflow-model-card.png")


def test_evidently_dashboard_has_panels_with_points(uis, short_loop, page, screenshots):
    from playwright.sync_api import expect

    page.goto(f"{uis['evidently']}/projects/{short_loop['project_id']}")
    for title in ("Verdict per window", "Accuracy: labelled rows and label-free estimates", "Served version"):
        expect(page.get_by_text(title, exact=True).first).to_be_visible()
    expect(page.get_by_text("This dashboard is currently empty")).to_have_count(0)
    # Evidently's charts (MUI X): a bar per judged window in the verdict panel, marks on the lines
    windows = short_loop["windows"]
    expect(page.locator(".MuiBarElement-root")).to_have_count(windows)
    marks = page.locator(".MuiMarkElement-root")
    expect(marks.first).to_be_visible()
    assert marks.count() >= 6 * windows, f"{marks.count()} points on the dashboard's lines"
    _shoot(page, screenshots / "evidently-dashboard.png")


def test_prefect_flow_run_shows_its_artifact(uis, short_loop, page, screenshots):
    from playwright.sync_api import expect

    out = short_loop["redistilled"]
    page.goto(f"{uis['prefect']}/runs/flow-run/{short_loop['redistill_run']}")
    verdict = "promoted over" if out["promoted"] else "not promoted"
    expect(page.get_by_text(f"redistill {NAME}: v{out['candidate_version']} {verdict}").first).to_be_visible()
    page.get_by_text("Artifacts", exact=True).first.click()
    expect(page.get_by_text(f"redistill-{NAME}", exact=False).first).to_be_visible()
    _shoot(page, screenshots / "prefect-flow-run-artifacts.png")
    page.get_by_text(f"redistill-{NAME}", exact=True).first.click()
    expect(page.get_by_role("heading", name=f"redistill {NAME}", exact=False).first).to_be_visible()
    expect(page.get_by_text("Gates", exact=True).first).to_be_visible()
    _shoot(page, screenshots / "prefect-artifact.png")
