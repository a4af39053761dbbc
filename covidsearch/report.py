"""One HTML page per search that opens anywhere, offline: leaderboard, hyperparameters against the
objective, the best trial's figures and the data summary.

Everything is inline (PNG as base64 data URIs, CSS in a style element, no script), so the file can be
mailed or archived alone; the same file is logged to the search run as report/report.html.
"""
from __future__ import annotations

import base64
import csv
import datetime
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from mlflow.tracking import MlflowClient

from . import metrics, plots, registry, text, tracking
from .data import metric_safe

CAPTIONS = {"curves": "Training and validation curves", "confusion": "Confusion matrix (test)",
            "roc": "ROC, one vs rest (test)", "gradcam": "Grad-CAM (test images)"}
LISTED = 50  # rows shown of long lists (skipped files, duplicate pairs); the artifacts hold them all
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1f2328; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #dafbe1; font-weight: 600; } tr.failed td { color: #8c959f; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; margin: 0.4em 0; }
figure { margin: 1em 0; } figcaption { font-weight: 600; }
.muted { color: #656d76; } .warn { color: #9a6700; font-weight: 600; } code { font-size: 0.9em; }
"""


@dataclass
class Search:
    """What the page shows, read from the store."""

    run: Any
    rows: list[dict[str, Any]]
    objective: str
    lower_is_better: bool
    summary: dict[str, Any]
    leakage: dict[str, Any]
    skipped: list[dict[str, str]]
    best: Any | None
    figures: dict[str, bytes]


def write(out: str | Path, search_id: str | None = None, tracking_uri: str | None = None,
          experiment: str | None = None) -> tuple[str, Path]:
    """Write the report of a search (default: the latest) to `out`, log it to the search run; (search id, path)."""
    client = tracking.client(tracking_uri, create=False)
    search_id = tracking.search_id(client, experiment, search_id)
    page = render(gather(client, search_id))
    path = Path(out)
    path.write_text(page, encoding="utf-8")
    tracking.log_report(client, search_id, page)
    return search_id, path


def gather(client: MlflowClient, search_id: str) -> Search:
    """The search run, its leaderboard, its data records and the best finished trial's figures."""
    run = tracking.get_run(client, search_id)
    rows = tracking.leaderboard(client, search_id)
    finished = [r for r in rows if r["status"] == "FINISHED" and r["objective"] is not None]
    best = client.get_run(finished[0]["run_id"]) if finished else None
    records = tracking.search_records(client, search_id)
    skipped = list(csv.DictReader(io.StringIO(records["skipped"])))
    files = tracking.FIGURE_FILES
    if best:
        registry.trial_model_id(client, best)  # its figures too, where its search left them for later
    figures = tracking.artifacts(client, best.info.run_id, tracking.FIGURES, files.values()) if best else {}
    return Search(run, rows, run.data.params.get("objective", "val_loss"),
                  tracking.minimised(run.data.params), records["summary"], records["leakage"],
                  [r for r in skipped if r.get("file")], best, {key: figures[f] for key, f in files.items()
                                                                if f in figures})


# ---------------------------------------------------------------- HTML


def render(search: Search) -> str:
    """The whole page as one string."""
    run = search.run
    title = f"covidsearch report: search {run.info.run_id}"
    body = [f"<h1>{_e(title)}</h1>", _overview(search), _leaderboard(search), _parallel(search), _best(search),
            _data(search)]
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]], numeric: Collection[int] = (),
           row_classes: list[str] | None = None) -> str:
    """An HTML table; cells are escaped, columns in `numeric` right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = []
    for k, row in enumerate(rows):
        cells = "".join(_cell(c, "num" if i in numeric else "") for i, c in enumerate(row))
        css = row_classes[k] if row_classes else ""
        lines.append(f"<tr class='{css}'>{cells}</tr>" if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _pairs(rows: list[tuple[str, Any]]) -> str:
    """A two-column table of labelled values, the label as the row header."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _cell(value: Any, css: str) -> str:
    return f"<td class='{css}'>{_e(value)}</td>" if css else f"<td>{_e(value)}</td>"


def _image(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _overview(search: Search) -> str:
    """What was searched, how, on which code; so the page stands on its own."""
    p, t = search.run.data.params, search.run.data.tags
    direction = "lower is better" if search.lower_is_better else "higher is better"
    return "<h2>Search</h2>" + _pairs([
        ("status", search.run.info.status), ("started", _when(search.run.info.start_time)),
        ("space", p.get("space", "-")), ("tuner", p.get("tuner", "-")),
        ("trials", f"{len(search.rows)} recorded (max_trials {p.get('max_trials', '-')}, "
                   f"max_epochs {p.get('max_epochs', '-')})"),
        ("objective", f"{search.objective} ({direction})"), ("data", p.get("data_root", "-")),
        ("code", f"git {t.get('git_commit', '-')}, keras {t.get('version.keras', '-')} on "
                 f"{t.get('keras_backend', '-')}")])


def _varying(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Hyperparameters that differ between trials, and the settings every trial shares."""
    keys = sorted({k for r in rows for k in r["params"]})
    varying = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]
    return varying, {k: rows[0]["params"].get(k, "") for k in keys if k not in varying}


def _leaderboard(search: Search) -> str:
    if not search.rows:
        return "<h2>Leaderboard</h2><p class='muted'>no trial recorded yet</p>"
    varying, shared = _varying(search.rows)
    best_id = search.best.info.run_id if search.best else None
    header = ["#", "run", "trial", "status", search.objective, "test accuracy [95% CI]",
              "COVID-19 sensitivity [95% CI]", "epochs", *varying]
    rows, classes = [], []
    for k, r in enumerate(search.rows, 1):
        epochs = "-" if r["epochs"] is None else int(r["epochs"])
        rows.append([k, r["run_id"][:12], r["trial"] + (" (baseline)" if r["baseline"] else ""), r["status"],
                     _num(r["objective"]), text.estimate(r["test_accuracy"], r["test_accuracy_ci"]),
                     text.estimate(r["test_sensitivity_covid_19"], r["test_sensitivity_covid_19_ci"]), epochs,
                     *(r["params"].get(h, "n/a") for h in varying)])
        classes.append("best" if r["run_id"] == best_id else "" if r["status"] == "FINISHED" else "failed")
    same = ", ".join(f"{k}={v}" for k, v in shared.items())
    lead = tracking.baseline_lead(search.rows)
    return ("<h2>Leaderboard</h2><p class='muted'>best objective first; the highlighted row is the best finished "
            "trial, shown in detail below. Brackets: bootstrap 95% intervals on the test images.</p>"
            + _table(header, rows, {0, 4, 5, 6, 7}, classes) + (f"<p>{_e(lead)}</p>" if lead else "")
            + f"<p class='muted'>Same in every trial: {_e(same) or '-'}</p>")


def _parallel(search: Search) -> str:
    """Hyperparameters against the objective, as a PNG drawn with the trial figures' code."""
    done = [r for r in search.rows if r["status"] == "FINISHED" and r["objective"] is not None]
    fig = plots.parallel_figure([r["params"] for r in done], [r["objective"] for r in done], search.objective,
                                search.lower_is_better)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=plots.DPI, format="png")
    return "<h2>Hyperparameters against the objective</h2>" + _image(buffer.getvalue(), "parallel coordinates")


def _best(search: Search) -> str:
    """The best trial's settings, test metrics and figures."""
    if search.best is None:
        return "<h2>Best trial</h2><p class='muted'>no finished trial yet</p>"
    run = search.best
    name = run.data.tags.get("mlflow.runName", run.info.run_id)
    parts = [f"<h2>Best trial: {_e(name)}</h2>",
             f"<p>run <code>{_e(run.info.run_id)}</code>, {_e(search.objective)} "
             f"{_num(run.data.metrics.get('best_' + search.objective))}</p>", _test_metrics(search)]
    for key, caption in CAPTIONS.items():
        png = search.figures.get(key)
        body = _image(png, caption) if png else "<p class='muted'>not logged for this trial</p>"
        parts.append(f"<figure><figcaption>{_e(caption)}</figcaption>{body}</figure>")
    return "\n".join(parts)


def _test_metrics(search: Search) -> str:
    """The best trial's test metrics with their 95% intervals: overall, then sensitivity and specificity per class;
    what TP/FP/TN/FN count beside them, as they can disagree with accuracy and the confusion matrix."""
    m = search.best.data.metrics
    overall = [(k, _test_estimate(m, k)) for k in ("accuracy", "auc", "macro_f1", "loss", "precision", "recall")]
    overall += [(k.upper(), _num(m.get(f"test_{k}"), 0)) for k in ("tp", "fp", "tn", "fn")]
    per_class = [[c, *(_test_estimate(m, f"{kind}_{metric_safe(c)}") for kind in ("sensitivity", "specificity"))]
                 for c in search.run.data.params.get("classes", "").split("|") if c]
    return ("<h3>Test metrics</h3><p class='muted'>Brackets: bootstrap 95% intervals (resampling the test images "
            "within each class).</p>" + _pairs(overall) + f"<p class='muted'>{_e(metrics.THRESHOLD_NOTE)}</p>"
            + _table(["class", "sensitivity [95% CI]", "specificity [95% CI]"], per_class, {1, 2}))


def _test_estimate(values: dict[str, float], name: str) -> str:
    """A test metric with its interval where one was recorded: alone, the number overstates what tens of images say."""
    return text.estimate(values.get(f"{tracking.TEST}{name}"), tracking.interval(values, f"{tracking.TEST}{name}"))


def _data(search: Search) -> str:
    """Counts per split and class, class weights, skipped files and duplicates across splits."""
    summary, leakage = search.summary, search.leakage
    if not summary:
        return "<h2>Data</h2><p class='muted'>no data summary recorded for this search</p>"
    classes, counts = summary["classes"], summary["counts"]
    rows = [[split, *(counts[split].get(c, 0) for c in classes), sum(counts[split].values())] for split in counts]
    rows.append(["all", *(sum(counts[s].get(c, 0) for s in counts) for c in classes),
                 sum(sum(v.values()) for v in counts.values())])
    weights = summary.get("class_weights", {})
    parts = ["<h2>Data</h2>", f"<p>{_e(summary.get('root', ''))} ({_e(summary.get('layout', ''))} layout), "
                              f"fingerprint <code>{_e(str(summary.get('fingerprint', ''))[:16])}</code></p>",
             _table(["split", *classes, "total"], rows, set(range(1, len(classes) + 2))),
             "<h3>Class weights (from the training split)</h3>",
             _table(["class", "weight"], [[c, f"{w:.4f}"] for c, w in weights.items()], {1}),
             _skipped(search.skipped, summary.get("root", "")), _leakage(leakage, summary.get("root", ""))]
    return "\n".join(parts)


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if root and path.startswith(root) else path


def _skipped(skipped: list[dict[str, str]], root: str) -> str:
    if not skipped:
        return "<h3>Skipped files</h3><p>none: every file decoded</p>"
    rows = [[_relative(r["file"], root), r["reason"]] for r in skipped[:LISTED]]
    more = _more(len(skipped), tracking.SKIPPED)
    return f"<h3 class='warn'>Skipped files: {len(skipped)}</h3>" + _table(["file", "reason"], rows) + more


def _more(total: int, record: str) -> str:
    """A note under a list cut at LISTED rows: where the whole list is."""
    if total <= LISTED:
        return ""
    return f"<p class='muted'>first {LISTED} of {total}; all in {tracking.SEARCH_RECORDS}/{record}</p>"


def _leakage(leakage: dict[str, Any], root: str) -> str:
    """Exact and near duplicates across splits: each one inflates test scores."""
    if not leakage:
        return "<h3>Leakage</h3><p class='muted'>no leakage check recorded</p>"
    exact, near = leakage.get("exact", []), leakage.get("near", [])
    css = " class='warn'" if exact or near else ""
    head = (f"<h3{css}>Leakage: {len(exact)} exact and {len(near)} near "
            f"duplicate pair(s) across splits</h3><p class='muted'>near: difference hashes within "
            f"{_e(leakage.get('near_threshold_bits', '?'))} bits; pass <code>--dedupe</code> to keep duplicates "
            "in one split</p>")
    pairs = [["exact", d["splits"], _relative(d["a"], root), _relative(d["b"], root), 0] for d in exact]
    pairs += [["near", d["splits"], _relative(d["a"], root), _relative(d["b"], root), d["bits"]] for d in near]
    if not pairs:
        return head
    more = _more(len(pairs), tracking.LEAKAGE)
    return head + _table(["kind", "splits", "a", "b", "bits apart"], pairs[:LISTED], {4}) + more
