"""optuna-dashboard for real: started on a finished run's database, its pages loaded in headless
Chromium (Debian's chromium package; scripts/chromium.sh installs it, as CI does), which must show
the run's candidates with the fitness the run database holds."""

import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from evomerge.run.loop import run_search
from evomerge.run.rundir import create_run
from evomerge.zoo import family


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        msg = "Chromium is not installed (bash scripts/chromium.sh install)"
        if os.environ.get("EVOMERGE_REQUIRE_BROWSER"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(browser: str, url: str, profile: Path) -> str:
    """The page's visible text once its scripts have run (headless, its own profile directory)."""
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          "--virtual-time-budget=20000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    dom = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture
def dashboard(tmp_path, zoo):
    """A finished 6-candidate run, and optuna-dashboard serving its database on a free local port."""
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "global", "fitness": {"suite": "zoo"}, "driver": {"name": "cma", "popsize": 3},
           "budget": {"max_candidates": 6}, "seed": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = create_run(tmp_path / "run.yaml", tmp_path / "run")
    run_search(run, live=False)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), run.db.url, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # until the server answers (or has died)
        try:
            urllib.request.urlopen(f"{base}/api/meta", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"optuna-dashboard did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
    yield run, base
    server.terminate()
    server.wait(timeout=30)


def test_the_dashboard_shows_the_runs_candidates_and_their_fitness(dashboard, tmp_path):
    import optuna

    browser = _chromium()
    run, base = dashboard
    rows = {r.trial_id: r for r in run.db.rows() if r.counted}
    study = optuna.load_study(study_name=run.db.name, storage=run.db.url)
    trials = {t.number: t for t in study.get_trials(deepcopy=False) if t._trial_id in rows}
    assert len(trials) == len(rows) == 6 and study.metric_names == ["fitness"]  # the dashboard's plot label
    numbers = ",".join(str(n) for n in sorted(trials))
    text = page_text(browser, f"{base}/dashboard/studies/{study._study_id}/trials?numbers={numbers}", tmp_path / "p")
    assert f"{run.db.name} (id={study._study_id})" in text and f"{len(study.trials)} Trials" in text
    shown = {int(n): (int(tid), float(v)) for n, tid, v in re.findall(
        r"Trial (\d+) \(trial_id=(\d+)\) Complete (?:Best Trial )?Note Value ([-0-9.e]+)", text)}
    assert set(shown) == set(trials)  # every candidate, with the fitness the run database records
    for number, (trial_id, value) in shown.items():
        assert trial_id == trials[number]._trial_id and value == pytest.approx(rows[trial_id].fitness, abs=1e-12)
    best = max(rows.values(), key=lambda r: r.fitness)
    assert study.best_value == best.fitness
    history = page_text(browser, f"{base}/dashboard/studies/{study._study_id}", tmp_path / "p")
    assert f"Best Trial (number={study.best_trial.number}) {best.fitness!r}" in history
    shot = tmp_path / "dashboard.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                    "--virtual-time-budget=20000", "--window-size=1400,900", f"--screenshot={shot}",
                    f"{base}/dashboard/studies/{study._study_id}"], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
