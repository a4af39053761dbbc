"""The `covidsearch` command: parse, call the library, print. Errors are one line and exit non-zero."""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # the command imports its library modules when it runs, so --help answers at once
    from . import search

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def command() -> NoReturn:
    """The covidsearch program: `main`, then `exit_at_once`. Every exit handler still runs first (temporary folders,
    MLflow's queues): this one is registered before any other, so it runs last."""
    from . import exit_at_once

    status = 1  # an uncaught error's, after Python has printed it
    atexit.register(lambda: exit_at_once(status))
    try:
        status = main()
    except SystemExit as stop:  # argparse's --help and usage errors
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import UserError, held_stderr

    if args.keras or getattr(args, "target_sensitivity", None) is not None:  # runs, ui, server and promote need
        # only MLflow (they start seconds sooner without Keras); a promote that finds an operating point predicts
        with held_stderr():
            import keras  # noqa: F401
            import keras_tuner  # noqa: F401
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"covidsearch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        resume = getattr(stop, "command", None)  # a search says how to go on (search.SearchInterrupted)
        print(f"\ninterrupted: {stop.note}. Resume with:\n  {resume}" if resume else "\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covidsearch", description=__doc__)
    p.set_defaults(keras=True)  # whether the command imports Keras (TensorFlow), see main
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    _search_commands(sub)
    _team_commands(sub)
    _inspect_commands(sub)
    _registry_commands(sub)
    return p


def _search_commands(sub: argparse._SubParsersAction) -> None:
    """run, worker and demo: the commands that train."""
    run = sub.add_parser("run", help="search hyperparameters; every trial goes to MLflow")
    run.add_argument("--data", required=True, help="dataset root (tutorial or Kaggle layout)")
    _search_options(run)
    run.add_argument("--max-failures", type=int, default=3, help="stop after this many failed trials in a row")
    run.add_argument("--workers-per-gpu", type=int, default=1, metavar="N",
                     help="run N trials at once sharing the device, each with 1/N of its memory (small models)")
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_const", const="required", dest="resume", default="auto",
                        help="continue the unfinished search with these settings (the default when there is one)")
    resume.add_argument("--fresh", action="store_const", const="never", dest="resume",
                        help="start a new search even if an identical one is unfinished")
    run.add_argument("--oracle", metavar="HOST:PORT",
                     help="be the chief of a distributed search: serve its oracle here (0.0.0.0:PORT for other "
                          "machines) while `covidsearch worker` processes run the trials")
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="join a distributed search: run the trials its chief hands out",
                            description="Give it the chief's --data (the same images), space and search options: "
                                        "it finds the chief's search run by them on the tracking server.")
    worker.add_argument("--data", required=True, help="dataset root (the same images as the chief's)")
    _search_options(worker)
    worker.add_argument("--oracle", required=True, metavar="HOST:PORT", help="where the chief serves the oracle")
    worker.add_argument("--worker-id", help="this worker's id, unique in the search (default: the host name and an "
                                            "id kept in --project-dir); restarted with the same id, a worker "
                                            "resumes its trial")
    worker.set_defaults(func=cmd_worker)

    demo = sub.add_parser("demo", help="a 2-trial search on generated (synthetic) images, for newcomers")
    demo.add_argument("--dir", default="demo-data", help="where to write the synthetic images")
    _store_options(demo)
    demo.set_defaults(func=cmd_demo)


def _team_commands(sub: argparse._SubParsersAction) -> None:
    """server: the tracking server a team and its distributed searches share."""
    server = sub.add_parser("server", help="an MLflow tracking server for a team (database runs, served artifacts)")
    server.add_argument("--backend-store-uri", help="SQLite or PostgreSQL URI (default: sqlite under ./mlruns/server)")
    server.add_argument("--artifacts-destination", help="where artifacts go: a directory or s3://BUCKET/PATH "
                                                        "(default ./mlruns/server/artifacts)")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s; 0.0.0.0 for "
                                                            "other machines)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, help="server processes (default: MLflow's)")
    server.add_argument("--allowed-hosts", help="Host headers to accept, e.g. mlflow:5000 behind a name "
                                                "(default: MLflow's, plus this host's name)")
    server.set_defaults(func=cmd_server, keras=False)


def _inspect_commands(sub: argparse._SubParsersAction) -> None:
    """runs, ui, report and figures: reading what the searches recorded."""
    runs = sub.add_parser("runs", help="leaderboard of a search (the latest by default)")
    runs.add_argument("--search", help="search run id (in any experiment)")
    _store_options(runs)
    runs.set_defaults(func=cmd_runs, keras=False)

    ui = sub.add_parser("ui", help="MLflow UI on the same store, on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    _store_options(ui)
    ui.set_defaults(func=cmd_ui, keras=False)

    report = sub.add_parser("report", help="one self-contained HTML page of a search (the latest by default)")
    report.add_argument("search", nargs="?", metavar="SEARCH_RUN_ID", help="search run id (in any experiment)")
    report.add_argument("--out", default="report.html", help="where to write the page (default report.html)")
    _store_options(report)
    report.set_defaults(func=cmd_report)

    figures = sub.add_parser("figures", help="trials' figures and MLflow models, made now if their search left them "
                                             "for later (trials that did not improve its best)")
    figures.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="FINISHED trial runs (see `covidsearch runs`)")
    _store_options(figures)
    figures.set_defaults(func=cmd_figures)


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./mlruns, "
                                          "or MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="MLflow experiment name (default: covidsearch)")


def _search_options(p: argparse.ArgumentParser) -> None:
    from . import FIGURES_FOR, workers  # no Keras in it: --help stays quick

    p.add_argument("--space", default="vanilla", help="experiments/NAME.toml or a path to a space file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a hyperparameter or fixed setting (repeatable)")
    p.add_argument("--weights", help="backbone weights: imagenet, none or a PATH to a no-top weights file")
    p.add_argument("--tuner", choices=["hyperband", "random", "bayesian"], help="default: the space's (hyperband)")
    p.add_argument("--max-trials", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--budget", metavar="TIME", help="search time, e.g. 90m or 1.5h: no trial starts that would end "
                                                   "past it (without --max-trials, the budget alone ends the search)")
    p.add_argument("--objective", help="validation metric to optimise (default val_loss)")
    p.add_argument("--seed", type=int, default=28)
    p.add_argument("--classes", nargs="+", help="class folders (default: COVID-19 Normal 'Viral Pneumonia')")
    p.add_argument("--test-per-class", type=int, help="held-out test images per class (default 40)")
    p.add_argument("--test-data", help="a separate test dataset instead of --test-per-class")
    p.add_argument("--dedupe", action="store_true", help="keep each group of (near-)duplicates in one split")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="do not start with the tutorial's configuration")
    p.add_argument("--precision", choices=["auto", "float32", "mixed"], default="auto")
    p.add_argument("--project-dir", help="where Keras Tuner keeps its state (default mlruns/tuner)")
    p.add_argument("--cache-dir", help="decoded-image cache (default mlruns/cache)")
    p.add_argument("--trials-per-worker", type=int, default=workers.TRIALS_PER_WORKER, metavar="N",
                   help="trials a worker process runs before it is replaced (default %(default)s; "
                        "1 = each trial in a fresh process)")
    p.add_argument("--max-worker-growth", type=float, default=workers.MAX_GROWTH, metavar="PCT",
                   help="replace a worker process once its memory after a trial, or its peak, is PCT%% above what "
                        "it was after its largest trial so far (default %(default)g)")
    p.add_argument("--figures", choices=FIGURES_FOR, default=FIGURES_FOR[0],
                   help="whose figures and MLflow model are made as the trials end: best (default): each trial that "
                        "improves the search's best, and the baseline; any other trial's when asked for (promote, "
                        "predict, evaluate, serve, report, `covidsearch figures`); every: all trials' (slower for "
                        "small trials)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    _target_option(p, "each trial's")
    _store_options(p)


def _target_option(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument("--target-sensitivity", type=float, metavar="S",
                   help=f"find {whose} COVID-19 threshold reaching this sensitivity on the validation split (0 < S <= "
                        "1, e.g. 0.97); the model carries it and calls COVID-19 from it, test scores there are logged")


def _options(args: argparse.Namespace, **more) -> search.Options:
    """search.Options from the options `run` and `worker` share, plus `more`."""
    from . import progress, search

    sets = list(args.sets) + ([f"weights={args.weights}"] if args.weights else [])
    return search.Options(
        data=args.data, space=args.space, sets=sets, tuner=args.tuner, max_trials=args.max_trials,
        max_epochs=args.max_epochs, budget=args.budget, objective=args.objective, seed=args.seed, classes=args.classes,
        test_per_class=args.test_per_class, test_data=args.test_data, dedupe=args.dedupe, baseline=args.baseline,
        tracking_uri=args.tracking_uri, experiment=args.experiment, project_dir=args.project_dir,
        cache_dir=args.cache_dir, precision=args.precision, trials_per_worker=args.trials_per_worker,
        max_worker_growth=args.max_worker_growth,
        progress=progress.mode_for(sys.stderr, args.quiet), oracle=args.oracle,
        target_sensitivity=args.target_sensitivity, figures=args.figures, **more)


def cmd_run(args: argparse.Namespace) -> int:
    from . import search

    result = search.run(_options(args, resume=args.resume, max_consecutive_failed_trials=args.max_failures,
                                 workers_per_gpu=args.workers_per_gpu))
    _print_leaderboard(args, result.search_run_id)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from . import search

    result = search.work(_options(args, worker_id=args.worker_id))
    print(f"worker {result.worker_id} finished {result.trials} trial(s) of search {result.search_run_id}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from . import server

    config = server.Config.make(args.backend_store_uri, args.artifacts_destination, args.host, args.port,
                                args.workers, args.allowed_hosts)
    return server.serve(config, lambda uri: print(f"MLflow tracking server ready: pass --tracking-uri {uri} "
                                                  "(Ctrl-C stops it)", flush=True))


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo, progress, search

    root = demo.make_dataset(args.dir, per_class=80, size=64)
    print(f"wrote SYNTHETIC images (not real X-rays) to {root}/; get the real database from "
          "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database")
    opts = search.Options(data=str(root), space="vanilla", tuner="random", max_trials=2, max_epochs=4,
                          test_per_class=10, tracking_uri=args.tracking_uri, experiment=args.experiment,
                          resume="never", progress=progress.mode_for(sys.stderr, False))
    result = search.run(opts)
    _print_leaderboard(args, result.search_run_id)
    print(f"\nopen the MLflow UI on this store:  {_self_command()} ui   (then http://127.0.0.1:5000)")
    return 0


def _self_command() -> str:
    """How to run covidsearch again as this process was run: `covidsearch` when that is on PATH, else its path
    (after `make demo` it is .venv/bin/covidsearch)."""
    program = Path(sys.argv[0])
    on_path = shutil.which("covidsearch")
    if on_path and program.name == "covidsearch" and Path(on_path).resolve() == program.resolve():
        return "covidsearch"
    if program.name == "covidsearch":
        return os.path.relpath(program)
    return f"{os.path.relpath(sys.executable)} -m covidsearch"


def _registry_commands(sub: argparse._SubParsersAction) -> None:
    """promote, evaluate and predict: the model registry and what comes after a search."""
    from . import DEFAULT_ALIAS, DEFAULT_NAME

    promote = sub.add_parser(
        "promote", help="register a trial's model and point an alias at it (undo: promote --version N)",
        description="Register the model of a FINISHED trial as a version of NAME (once per run: promoting the same "
                    "run again adds no version) and point ALIAS at it. The version is tagged with the trial's test "
                    "metrics, hyperparameters (hp.*), search_run_id, data_fingerprint and classes. UNDO: the version "
                    "that held the alias is tagged ALIAS.demoted_at and ALIAS.replaced_by, the new holder "
                    "ALIAS.previous_version; `covidsearch promote --version N` moves the alias back to version N "
                    "(every promote prints that command).")
    promote.add_argument("run_id", nargs="?", metavar="RUN_ID", help="a FINISHED trial run (see `covidsearch runs`)")
    promote.add_argument("--version", help="instead of RUN_ID: point the alias at this existing version (undo)")
    promote.add_argument("--name", default=DEFAULT_NAME, help="registered model name (default %(default)s)")
    promote.add_argument("--alias", default=DEFAULT_ALIAS, help="alias to move (default %(default)s)")
    promote.add_argument("--require", action="append", default=[], metavar="METRIC>=VALUE",
                         help="refuse unless the test metric meets the bound, e.g. test_sensitivity_covid_19>=0.95 "
                              "(>= or <=; repeatable)")
    _target_option(promote, "the trial's")
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./mlruns)")
    promote.set_defaults(func=cmd_promote, keras=False)

    ensemble = sub.add_parser("ensemble", help="average the K best trials of a search into one promotable model",
                              description="Mean class probabilities of the K best FINISHED trials (by the search's "
                                          "validation objective) as one model taking uint8 pixels at the largest "
                                          "member input size, scored on the search's test split and logged as a "
                                          "child run of the search (kind ensemble): promote, predict, evaluate and "
                                          "serve take its run id like a trial's.")
    ensemble.add_argument("search", nargs="?", metavar="SEARCH_RUN_ID", help="search run id (default: the latest)")
    ensemble.add_argument("--top", type=int, default=3, metavar="K", help="how many trials (default %(default)s)")
    _target_option(ensemble, "the ensemble's")
    _store_options(ensemble)
    ensemble.set_defaults(func=cmd_ensemble)

    models_help = "a trial run id, models:/NAME@ALIAS, models:/NAME/VERSION or a .keras file"
    evaluate = sub.add_parser("evaluate", help="a model's metrics on every image of a dataset folder")
    evaluate.add_argument("model", metavar="MODEL", help=models_help)
    evaluate.add_argument("--data", required=True, help="dataset root (tutorial or Kaggle layout)")
    evaluate.add_argument("--log", action="store_true",
                          help="record an evaluation run whose metrics MLflow links to the model's LoggedModel")
    _store_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="predicted class and class probabilities for images")
    predict.add_argument("model", metavar="MODEL", help=models_help)
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    predict.add_argument("--format", choices=["table", "csv", "json"], default="table")
    predict.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./mlruns)")
    predict.set_defaults(func=cmd_predict)

    serve = sub.add_parser("serve", help="MLflow's scoring server on a model: base64 PNG/JPEG files in, classes out",
                           description='POST {"inputs": ["<base64 PNG>", ...]} or {"dataframe_records": [{"image": '
                                       '"<base64 JPEG>"}, ...]} to /invocations; each image gets `predicted` and '
                                       "one probability per class.")
    serve.add_argument("model", nargs="?", default=f"models:/{DEFAULT_NAME}@{DEFAULT_ALIAS}", metavar="MODEL",
                       help="a trial run id, models:/NAME@ALIAS or models:/NAME/VERSION (default %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s; 0.0.0.0 for "
                                                           "other machines)")
    serve.add_argument("--port", type=int, default=5001, help="default %(default)s (the MLflow UI takes 5000)")
    serve.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./mlruns)")
    serve.set_defaults(func=cmd_serve, keras=False)


def cmd_promote(args: argparse.Namespace) -> int:
    from . import registry

    if (args.run_id is None) == (args.version is None):
        raise registry.RegistryError("promote takes a trial RUN_ID or --version N, not both or neither")
    if args.version and args.target_sensitivity is not None:
        raise registry.RegistryError("--target-sensitivity takes a RUN_ID: a version keeps the threshold it has")
    client = registry.connect(args.tracking_uri)
    if args.version:
        done = registry.promote_version(client, args.version, args.name, args.alias, args.require)
    elif args.target_sensitivity is not None:
        from . import operating

        done, point = operating.promote(client, args.run_id, args.target_sensitivity, args.name, args.alias,
                                        args.require)
        print(point.line())
    else:
        done = registry.promote(client, args.run_id, args.name, args.alias, args.require)
    print(done.summary())
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from . import ensembles, registry, tracking

    client = registry.connect(args.tracking_uri)
    search_id = tracking.search_id(client, args.experiment, args.search)
    print(ensembles.summary(ensembles.build(client, search_id, args.top, args.target_sensitivity)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import inference, tracking

    loaded = inference.load(args.model, args.tracking_uri)
    result = inference.evaluate(loaded, args.data)
    warning = inference.training_overlap(loaded, result, args.tracking_uri)
    if warning:
        print(warning, file=sys.stderr)
    print(inference.format_evaluation(loaded, result))
    if args.log:
        client, experiment_id = tracking.connect(args.tracking_uri, args.experiment)
        print(f"\nlogged as run {inference.log_evaluation(client, experiment_id, loaded, result)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import inference

    files = inference.image_paths(args.paths)  # a mistyped path fails before the model loads
    loaded = inference.load(args.model, args.tracking_uri)
    predictions = inference.predict(loaded, files)
    if loaded.operating_note:  # above the table; CSV and JSON on stdout stay machine-readable
        print(loaded.operating_note, file=sys.stdout if args.format == "table" else sys.stderr)
    print(inference.format_predictions(predictions, args.format))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import scoring

    return scoring.serve(scoring.prepare(args.model, args.host, args.port, args.tracking_uri))


def cmd_runs(args: argparse.Namespace) -> int:
    _print_leaderboard(args, args.search)
    return 0


def _print_leaderboard(args: argparse.Namespace, search_id: str | None) -> None:
    from . import tracking

    client = tracking.client(args.tracking_uri, create=False)
    search_id = tracking.search_id(client, args.experiment, search_id)
    rows = tracking.leaderboard(client, search_id)
    objective = client.get_run(search_id).data.params.get("objective", "val_loss")
    print(f"\nsearch {search_id}: {len(rows)} trial(s), best {objective} first")
    print(format_table(rows, objective))


def format_table(rows: list[dict], objective: str) -> str:
    """The leaderboard as aligned text, test scores with their 95% intervals, and whether the lead over the
    baseline is more than the test set's noise."""
    from . import text, tracking

    skip = {"color_mode", "val_fraction", "test_per_class", "patience", "min_delta", "model", "weights"}
    lines = [["run_id", "trial", "status", objective, "test_acc [95% CI]", "covid_sens [95% CI]", "hyperparameters"]]
    for r in rows:
        hps = " ".join(f"{k}={v}" for k, v in r["params"].items() if k not in skip)
        lines.append([r["run_id"], r["trial"] + (" baseline" if r["baseline"] else ""), r["status"],
                      text.estimate(r["objective"], None), text.estimate(r["test_accuracy"], r["test_accuracy_ci"]),
                      text.estimate(r["test_sensitivity_covid_19"], r["test_sensitivity_covid_19_ci"]), hps])
    lead = tracking.baseline_lead(rows)
    return text.table(lines) + (f"\n{lead}" if lead else "")


def cmd_ui(args: argparse.Namespace) -> int:
    from . import server, tracking

    uri = tracking.store_uri(args.tracking_uri)
    tracking.client(uri)  # a new store is created here, once, not by the UI and a search at the same moment
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    if tracking.sqlite_path(uri):
        cmd += ["--default-artifact-root", (Path(tracking.STORE_DIR) / "artifacts").resolve().as_uri()]
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    return server.run_child(cmd)


def cmd_report(args: argparse.Namespace) -> int:
    from . import report, tracking

    search_id, path = report.write(args.out, args.search, args.tracking_uri, args.experiment)
    print(f"wrote {path} for search {search_id} (also logged to that run as {tracking.REPORT})")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from . import registry, tracking

    client = registry.connect(args.tracking_uri)
    for run_id in args.run_ids:
        model_id = registry.finished_trial(client, run_id).model_id
        print(f"run {run_id}: figures in its artifacts under {tracking.FIGURES}/, MLflow model models:/{model_id}")
    return 0


if __name__ == "__main__":
    command()
