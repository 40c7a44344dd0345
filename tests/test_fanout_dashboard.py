"""``autoskd dashboard``: optuna-dashboard on 127.0.0.1, opened in headless Chromium (Debian's
``chromium`` package; the test target installs it, and the test skips with the reason where it
is missing). The study page must show the study and its trials."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from autoskd.cli import main

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    """A study as a tune leaves it: named metric, finished trials with per-epoch values."""
    path = tmp_path_factory.mktemp("dash") / "optuna.db"
    url = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name="kd-dashboard-check", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["dev_acc"])

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-5, 1e-3, log=True)
        temperature = trial.suggest_float("method_options.temperature", 1, 8)
        for epoch in (1, 2, 3):
            trial.report(0.5 + 0.1 * epoch * (lr * 1e3) ** 0.2 - 0.01 * temperature, epoch)
        return 0.5 + 0.3 * (lr * 1e3) ** 0.2 - 0.01 * temperature

    study.optimize(objective, n_trials=6)
    return url


@pytest.fixture(scope="module")
def server(storage):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "autoskd.cli", "dashboard", "--storage", storage, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a busy shared machine can take minutes to import everything
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/studies", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"dashboard exited: {proc.stdout.read()}")
                if time.time() > deadline:
                    pytest.fail("the dashboard did not answer within 300 s")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dashboard_binds_localhost_and_serves_the_study(server):
    import json

    studies = json.loads(urllib.request.urlopen(f"{server}/api/studies", timeout=30).read())["study_summaries"]
    assert [s["study_name"] for s in studies] == ["kd-dashboard-check"]


def test_dashboard_missing_storage_is_one_line(capsys, tmp_path):
    assert main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist yet" in err[0]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`; "
                                              "`make test` installs it)")
def test_study_page_in_headless_chromium(server, tmp_path):
    page = f"{server}/dashboard/studies/1"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000"]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=300).stdout
    assert "kd-dashboard-check" in dom  # the study's name in the header
    for n in range(6):
        assert f"trial #{n}" in dom, n  # every trial in the history plot
    assert "dev_acc" in dom  # the metric name the tune set
    shot = tmp_path / "dashboard.png"
    subprocess.run([*common, "--window-size=1400,1000", "--hide-scrollbars", f"--screenshot={shot}", page],
                   capture_output=True, text=True, timeout=300)
    assert shot.stat().st_size > 10_000
    if os.environ.get("AUTOSKD_SAVE_DASHBOARD_SHOT"):  # refresh the committed screenshot
        shutil.copy(shot, ROOT / "benchmarks" / "results" / "dashboard_study.png")
