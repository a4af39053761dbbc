"""Issue 8: `covidsearch report` writes one self-contained HTML page that a browser renders offline."""
from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli, small_search
from covidsearch import metrics, report, text, tracking

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def reported(xray_dir, tmp_path_factory):
    """A 2-trial search through the CLI, then `covidsearch report` on it (the latest search)."""
    work = tmp_path_factory.mktemp("report")
    client, experiment_id, _ = small_search(work, xray_dir)
    result = cli("report", "--out", "search-report.html", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    search = client.search_runs([experiment_id], "tags.covidsearch_kind = 'search'")[0]
    trials = client.search_runs([experiment_id], "tags.covidsearch_kind = 'trial'")
    return work, work / "search-report.html", client, search, trials, result.stdout


def test_every_trial_logs_its_figures(reported):
    _, _, client, _, trials, _ = reported
    for run in trials:
        assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {
            "figures/curves.png", "figures/confusion_matrix.png", "figures/roc.png", "figures/gradcam.png"}
        # The search process draws them after the trial, so they are timed as part of recording it.
        assert 0 < run.data.metrics["figures_seconds"] < run.data.metrics["record_seconds"]


def test_every_trial_records_intervals_that_contain_its_test_scores(reported):
    _, _, _, _, trials, _ = reported
    for run in trials:
        m = run.data.metrics
        for name in ("accuracy", "sensitivity_covid_19", "specificity_covid_19", "macro_f1", "auc"):
            low, high = tracking.interval(m, f"test_{name}")
            assert 0 <= low <= m[f"test_{name}"] <= high <= 1, name


def test_runs_shows_the_intervals_and_whether_the_lead_over_the_baseline_is_noise(reported):
    work, _, client, search, trials, _ = reported
    result = cli("runs", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_acc [95% CI]" in result.stdout and "covid_sens [95% CI]" in result.stdout
    for run in trials:
        m = run.data.metrics
        assert text.estimate(m["test_accuracy"], tracking.interval(m, "test_accuracy")) in result.stdout
        assert text.estimate(m["test_sensitivity_covid_19"], tracking.interval(m, "test_sensitivity_covid_19")) \
            in result.stdout
    lead = tracking.baseline_lead(tracking.leaderboard(client, search.info.run_id))
    assert lead and "the baseline" in lead and "95% interval [" in lead and lead.endswith("(24 test images)")
    assert result.stdout.rstrip().splitlines()[-1] == lead  # the line under the table


def test_report_is_one_file_with_everything_inline(reported):
    work, page_path, client, search, trials, stdout = reported
    assert str(page_path.name) in stdout and search.info.run_id in stdout
    page = page_path.read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    sources = re.findall(r"""\b(?:src|href)=['"]([^'"]*)['"]""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources
    assert len(sources) == 5  # parallel coordinates + the best trial's four figures
    for source in sources:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 15
    for run in trials:
        assert run.info.run_id[:12] in page
    for heading in ("Leaderboard", "Hyperparameters against the objective", "Best trial", "Grad-CAM", "Class weights",
                 "Skipped files", "Leakage: 0 exact and 0 near", "COVID-19", "Viral Pneumonia", "(baseline)"):
        assert heading in page, heading
    best = search.data.tags["best_trial_run_id"]
    assert re.search(rf"<tr class='best'><td[^>]*>1</td><td>{best[:12]}</td>", page)
    assert {a.path for a in client.list_artifacts(search.info.run_id, "report")} == {tracking.REPORT}
    logged = Path(client.download_artifacts(search.info.run_id, tracking.REPORT, str(work)))
    assert logged.read_text(encoding="utf-8") == page


def test_report_shows_the_intervals_the_lead_line_and_what_tp_fp_tn_fn_count(reported):
    _, page_path, client, search, trials, _ = reported
    page = html.unescape(page_path.read_text(encoding="utf-8"))
    for run in trials:  # the leaderboard
        m = run.data.metrics
        assert text.estimate(m["test_accuracy"], tracking.interval(m, "test_accuracy")) in page
    best = client.get_run(search.data.tags["best_trial_run_id"]).data.metrics  # the best trial's test metrics
    for name in ("auc", "macro_f1", "sensitivity_covid_19", "specificity_covid_19"):
        assert text.estimate(best[f"test_{name}"], tracking.interval(best, f"test_{name}")) in page, name
    assert tracking.baseline_lead(tracking.leaderboard(client, search.info.run_id)) in page
    assert metrics.THRESHOLD_NOTE in page


def test_report_of_a_named_search_from_python_and_an_unknown_one(reported, tmp_path):
    work, page_path, client, search, _, _ = reported
    search_id, path = report.write(tmp_path / "named.html", search.info.run_id, client.tracking_uri)
    assert search_id == search.info.run_id and path.read_text(encoding="utf-8").count("data:image/png") == 5
    result = cli("report", "0123456789abcdef", "--out", str(tmp_path / "none.html"), cwd=work)
    assert result.returncode == 2 and "unknown run id '0123456789abcdef'" in result.stderr
    assert not (tmp_path / "none.html").exists()


def test_report_renders_in_headless_chromium(reported, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must run this test (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    _, page_path, _, _, _, _ = reported
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1280,2000",
         "--enable-logging=stderr", "--v=0", page_path.as_uri()],
        capture_output=True, text=True, timeout=120)
    print(f"report screenshot: {screenshot}")
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-3000:]
    # Console messages name their source; the page has no script, so any message from it is a fault.
    console = [line for line in result.stderr.splitlines()
               if ("CONSOLE" in line or "Uncaught" in line) and page_path.as_uri() in line]
    assert not console, console
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.int64)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.mean(-1).std() > 15, "the screenshot looks blank"
    coloured = (pixels.max(-1) - pixels.min(-1) > 80).sum()
    assert coloured > 1000, f"only {coloured} coloured pixels: the figures did not render"
