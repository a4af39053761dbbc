"""Trials per hour (issue 12): what a covidsearch trial costs beyond its training, against plain Keras Tuner.

The same random ConvNet search (the vanilla space, seed 28, --trials trials of --epochs epochs, no baseline
trial, so both tuners draw the same points) runs on the real data as three whole commands, one after the other,
each in fresh processes and each with its own tuner directory:
  plain      Keras Tuner's RandomSearch in one process (this file, --side plain): a HyperModel with the vanilla
             space's hyperparameters, the tutorial's ConvNet, metrics and class weights, validation every epoch;
             no test set, no tracking. It is the search a user would otherwise write.
  covidsearch  `covidsearch run` into a private SQLite MLflow store: worker processes, every trial recorded
             (epochs, test metrics and intervals, confusion table, its checkpoint and figures' data; the figures
             and the MLflow model of each trial that improves the best, the default --figures best).
  no-logging   the same command with the trials' own MLflow logging turned into no-ops (the notes the workers
             send, their epochs' metrics, not written; the model and figures' data the worker saves and the search's
             recorder logs; a sitecustomize.py on PYTHONPATH does it in the search and in every worker, for this
             benchmark only).
             The search's own run bookkeeping is kept, and each epoch's seconds are noted to a file instead of
             logged, so that the difference in wall time splits into the trials' epochs and the rest.
Every side reads the same pixel cache, filled for every input size before the clock starts (a warm cache).

It prints, per side, the wall time of the whole command and per trial; the ratio covidsearch / plain against
the target of at most 1.25x; the per-trial fixed cost (a trial's share of the search's wall time, from the end
of the previous trial to the end of this one, minus its epochs: train_seconds + val_seconds) against 1.5 s on
CPU, with covidsearch's parts from the trials' setup_seconds_* metrics (and the seconds the search's recorder
spent logging each trial's record while the next one trained, which are not part of it); and the
tracking overhead, (covidsearch - no-logging) / covidsearch, against 2%, in wall time and in CPU seconds (user +
system, of each command and every process it waited for: its workers included). The same command's wall time moves
by more than the 2% to be measured from one run to the next on a shared machine (a worker's memory decides when it is
recycled, a recycling costs a standby's start-up, and a 2-epoch fit itself varies by a tenth), so the overhead is the
mean over rounds (whose order of sides alternates) with its 95% interval, and the target is called met only when the
whole interval is at or under it. Which trials a worker process is replaced after is itself such noise: the memory
bound is crossed after different trials in each run (two or three replacements a search, each a standby's start-up
beside the training); --recycle-every N replaces every worker after N trials and never for its memory, on both
covidsearch sides, so that they differ only in their tracking (the report says, for either policy, how many workers
each side replaced and their memory after a trial: whether tracking itself makes the workers grow). Each side first
runs two unreported trials (--no-warm-up skips them): the first command on a fresh machine runs cold. Figures are
printed, never asserted:

    .venv/bin/python benchmarks/throughput.py [--data DIR] [--trials 20] [--epochs 2] [--rounds 1]
    .venv/bin/python benchmarks/throughput.py --tutorial      # the fixed cost's target: the tutorial's ConvNet
    .venv/bin/python benchmarks/throughput.py --tutorial --sides covidsearch no-logging --rounds 12   # the overhead
    .venv/bin/python benchmarks/throughput.py --tutorial --sides covidsearch no-logging --rounds 24 --recycle-every 7
    .venv/bin/python benchmarks/throughput.py --trials 3 --epochs 1      # a quick check that it runs

The random draw's trials range from 32 px with 16 filters to 128 px ConvNets of 130M weights, whose model file alone
is half a gigabyte; the issue's fixed-cost target is for the tutorial's ConvNet (50 px, 32 filters, 256 units,
batch 250), which --tutorial pins on both sides, still drawing dropout and learning rate (the same points on both).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "covid-radiography"
SIZES = (32, 50, 64, 96, 128)  # the vanilla space's input sizes, all filled into the cache before timing
HYPERPARAMETERS = ("input_size", "filters", "dense_units", "dropout", "batch_size", "learning_rate")
SEED, TEST_PER_CLASS, VAL_FRACTION = 28, 40, 0.2  # covidsearch's defaults, so both sides train on the same split
TUTORIAL = ("input_size=50", "filters=32", "dense_units=256", "batch_size=250")  # dropout, rate still drawn
RATIO_TARGET, FIXED_TARGET, TRACKING_TARGET = 1.25, 1.5, 2.0
PACKAGES = ("keras", "tensorflow", "keras-tuner", "mlflow")
REST = "rest (pipe, clear_session, oracle, search-side calls)"  # the fixed cost its parts do not name
RECORDER = "record logged by the search (off the path)"  # recorder.py: not in the fixed cost
NO_LOGGING = '''
"""Written by benchmarks/throughput.py for its no-logging side: a trial's own MLflow logging does nothing."""
import json
import os

from covidsearch import recorder, tracking

recorder.write = lambda *args, **kwargs: None  # the worker saves no model or figures' data
recorder.log_pending = lambda *args, **kwargs: None  # the search logs none


def _noted(found, run_id):
    """A trial's notes (its epochs, its operating point) not written: each epoch's seconds are noted to a file instead,
    so the benchmark can tell the epochs from the rest."""
    def note(trial_note):
        if "train_seconds" in trial_note.metrics:
            with open(os.environ["THROUGHPUT_EPOCHS"], "a") as noted:
                seconds = trial_note.metrics["train_seconds"] + trial_note.metrics["val_seconds"]
                noted.write(json.dumps([run_id, seconds]) + "\\n")

    return note


tracking.writer = _noted
'''


@dataclass
class Trial:
    """One trial as a side saw it, in seconds: its share of the search's wall time and its epochs."""

    values: dict[str, Any]
    span: float  # from the end of the previous trial (or this one's start) to the end of this one
    epochs: float
    parts: dict[str, float] = field(default_factory=dict)  # covidsearch: setup_seconds_* and the rest of its run
    first: bool = False  # covidsearch: the first trial of its worker process
    recycled: str | None = None  # covidsearch: why its worker process was replaced after it
    worker_mb: float | None = None  # covidsearch: its worker process's resident memory after it

    @property
    def fixed(self) -> float:
        return self.span - self.epochs


@dataclass
class Side:
    """One whole command's wall time and its trials."""

    name: str
    wall: float
    cpu: float  # CPU seconds (user + system) of the command and every process it waited for: work, not the clock
    trials: list[Trial]

    @property
    def replaced(self) -> int:
        """Worker processes replaced during the search (covidsearch sides)."""
        return sum(t.recycled is not None for t in self.trials)

    @property
    def worker_mb(self) -> float:
        """A worker's mean resident memory after a trial (covidsearch sides): whether tracking makes workers grow."""
        return _mean([t.worker_mb for t in self.trials if t.worker_mb is not None])


# ---------------------------------------------------------------- the plain Keras Tuner side (its own process)


def plain_search(data_dir: Path, cache: Path, trials: int, epochs: int, sets: list[str], project: Path,
                 out: Path) -> None:
    """Keras Tuner's RandomSearch over the vanilla space (`sets` pinned) in this process; per-trial times to `out`
    as JSON."""
    import keras
    import keras_tuner as kt
    import numpy as np

    from covidsearch import data, spaces

    dataset = data.scan(data_dir, cache_dir=cache)
    split = data.split(dataset, SEED, VAL_FRACTION, TEST_PER_CLASS)
    pixels = {size: np.ascontiguousarray(data.arrays(dataset, size, "rgb", cache)) for size in SIZES}  # in memory
    onehot = keras.utils.to_categorical(dataset.labels, len(dataset.classes))
    weights = data.class_weights(dataset.labels[split.train], len(dataset.classes))
    epoch_seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            epoch_seconds.append(time.perf_counter() - self.started)

    space = spaces.load("vanilla").pin(sets)

    class ConvNet(kt.HyperModel):
        def build(self, hp: kt.HyperParameters) -> keras.Model:
            for param in space.params.values():  # the space's order and ranges, --set pins as hp.Fixed
                param.declare(hp, space.pinned.get(param.name))
            size, filters, units = hp.get("input_size"), hp.get("filters"), hp.get("dense_units")
            dropout, rate = hp.get("dropout"), hp.get("learning_rate")
            model = keras.Sequential([
                keras.Input((size, size, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                keras.layers.Conv2D(filters, 3, activation="relu"), keras.layers.MaxPooling2D(2),
                keras.layers.Dropout(dropout), keras.layers.Flatten(), keras.layers.Dense(units, activation="relu"),
                keras.layers.Dense(len(dataset.classes), activation="softmax")])
            model.compile(keras.optimizers.Adam(rate), "categorical_crossentropy",
                          metrics=["accuracy", keras.metrics.TruePositives(name="tp"),
                                   keras.metrics.FalsePositives(name="fp"), keras.metrics.TrueNegatives(name="tn"),
                                   keras.metrics.FalseNegatives(name="fn"), keras.metrics.Precision(name="precision"),
                                   keras.metrics.Recall(name="recall")])
            return model

        def fit(self, hp: kt.HyperParameters, model: keras.Model, **kwargs: Any) -> Any:
            x = pixels[hp.get("input_size")]
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), EpochTimer()]
            return model.fit(x[split.train], onehot[split.train], batch_size=hp.get("batch_size"),
                             validation_data=(x[split.val], onehot[split.val]), class_weight=weights, **kwargs)

    rows: list[dict[str, Any]] = []

    class Timed(kt.RandomSearch):
        """RandomSearch that notes when each trial ends and how long its epochs took."""

        def _configure_tensorboard_dir(self, *args: Any) -> None:
            """Keras Tuner imports TensorBoard here for TensorBoard callbacks, and there are none (nor TensorBoard)."""

        def on_trial_end(self, trial: Any) -> None:
            super().on_trial_end(trial)
            rows.append({"values": dict(trial.hyperparameters.values), "end": time.time(),
                         "epochs": sum(epoch_seconds)})
            epoch_seconds.clear()

    tuner = Timed(ConvNet(), objective="val_loss", max_trials=trials, seed=SEED, directory=str(project),
                  project_name="plain", overwrite=True)
    started = time.time()
    tuner.search(epochs=epochs, verbose=0)
    out.write_text(json.dumps({"started": started, "trials": rows}))


# ---------------------------------------------------------------- the sides, as whole commands


def _cpu_of_children() -> float:
    """CPU seconds of the finished processes this one waited for, and of theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of a command; its output is shown only when it fails."""
    started, cpu = time.perf_counter(), _cpu_of_children()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          check=False)
    if done.returncode != 0:
        sys.exit(f"throughput.py: {' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, _cpu_of_children() - cpu


def run_plain(args: argparse.Namespace, work: Path) -> Side:
    """The plain Keras Tuner side, in a fresh process."""
    out = work / "plain.json"
    wall, cpu = _run([sys.executable, __file__, "--side", "plain", "--data", str(args.data),
                      "--trials", str(args.trials), "--epochs", str(args.epochs), *_sets(args),
                      "--cache-dir", str(args.cache_dir), "--project-dir", str(work), "--out", str(out)], work)
    found = json.loads(out.read_text())
    ends = [found["started"], *(row["end"] for row in found["trials"])]
    return Side("plain", wall, cpu, [Trial(row["values"], ends[i + 1] - ends[i], row["epochs"])
                                     for i, row in enumerate(found["trials"])])


def _sets(args: argparse.Namespace) -> list[str]:
    """The --set pins, for either side's command line."""
    return [arg for item in args.sets for arg in ("--set", item)]


def run_covidsearch(args: argparse.Namespace, work: Path) -> Side:
    """`covidsearch run`, every trial recorded in full; its trials read back from its store."""
    return _covidsearch(args, work, "covidsearch", logging=True)


def run_no_logging(args: argparse.Namespace, work: Path) -> Side:
    """`covidsearch run` with the trials' own MLflow logging turned into no-ops."""
    return _covidsearch(args, work, "no-logging", logging=False)


def _covidsearch(args: argparse.Namespace, work: Path, name: str, logging: bool) -> Side:
    """`covidsearch run` in fresh processes into a store of its own."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(work) if not logging else "", str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")])),
           "THROUGHPUT_EPOCHS": str(work / "epochs.jsonl")}
    if not logging:
        (work / "sitecustomize.py").write_text(textwrap.dedent(NO_LOGGING))
    recycling = (["--trials-per-worker", str(args.recycle_every), "--max-worker-growth", "inf"]
                 if args.recycle_every else [])
    wall, cpu = _run([sys.executable, "-m", "covidsearch.cli", "run", "--space", "vanilla", "--data", str(args.data),
                      "--tuner", "random", "--max-trials", str(args.trials), "--max-epochs", str(args.epochs),
                      *_sets(args), "--seed", str(SEED), "--no-baseline", "--tracking-uri", uri,
                      "--project-dir", str(work / "tuner"), "--cache-dir", str(args.cache_dir), "--quiet",
                      *recycling], work, env)
    return Side(name, wall, cpu, _recorded_trials(uri, None if logging else _noted_epochs(work / "epochs.jsonl")))


def _noted_epochs(noted: Path) -> dict[str, float]:
    """The no-logging side's epoch seconds by trial run, from the file its trials noted them to."""
    seconds: dict[str, float] = {}
    for line in noted.read_text().splitlines():
        run_id, epoch = json.loads(line)
        seconds[run_id] = seconds.get(run_id, 0.0) + epoch
    return seconds


def _recorded_trials(uri: str, noted: dict[str, float] | None = None) -> list[Trial]:
    """A covidsearch side's trials from MLflow: spans from run end to run end, epochs from their per-epoch seconds
    (logged, or `noted` by the no-logging side); which worker trained each and its memory after it, which the search
    itself records, with or without the trials' own logging."""
    from covidsearch import tracking

    client, experiment_id = tracking.connect(uri, create=False)
    search = tracking.latest_search(client, experiment_id)
    runs = sorted(tracking.trial_runs(client, search), key=lambda r: int(r.data.tags[tracking.TRIAL_ID]))
    trials, previous = [], None
    for run in runs:
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        epochs = noted.get(run.info.run_id, 0.0) if noted is not None else sum(
            m.value for key in ("train_seconds", "val_seconds")
            for m in client.get_metric_history(run.info.run_id, key))
        span = end - (previous if previous is not None else start)
        parts = {k[len(tracking.SETUP):]: v for k, v in run.data.metrics.items() if k.startswith(tracking.SETUP)}
        parts[REST] = span - epochs - sum(parts.values())
        parts[RECORDER] = run.data.metrics.get(tracking.RECORD_SECONDS, 0.0)
        values = {k: v for k, v in run.data.params.items() if k in HYPERPARAMETERS}
        tags = run.data.tags
        trials.append(Trial(values, span, epochs, parts, tags.get(tracking.WORKER_TRIAL) == "1",
                            tags.get(tracking.WORKER_RECYCLED), run.data.metrics.get(tracking.WORKER_RSS)))
        previous = end
    return trials


SIDES = {"plain": run_plain, "covidsearch": run_covidsearch, "no-logging": run_no_logging}

# ---------------------------------------------------------------- the report


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(rounds: list[dict[str, Side]], args: argparse.Namespace) -> None:
    """Per side, per round; then the figures of the sides that ran against their targets, as medians over rounds."""
    print(f"\n{'round':>5}  {'side':<12} {'wall s':>7} {'CPU s':>7} {'s/trial':>8} {'epochs s/trial':>15} "
          f"{'fixed s/trial':>14}")
    for i, sides in enumerate(rounds, 1):
        for side in (sides[name] for name in SIDES if name in sides):
            trials = side.trials
            print(f"{i:>5}  {side.name:<12} {side.wall:>7.1f} {side.cpu:>7.1f} {side.wall / args.trials:>8.2f} "
                  f"{_mean([t.epochs for t in trials]):>15.2f} {_mean([t.fixed for t in trials]):>14.2f}")
    if "no-logging" in args.sides:
        _tracking_overhead(rounds)
    if "plain" not in args.sides:
        return
    ratio = statistics.median(s["covidsearch"].wall / s["plain"].wall for s in rounds)
    fixed = statistics.median(_mean([t.fixed for t in s["covidsearch"].trials]) for s in rounds)
    same = all(_same_points(s["plain"], s["covidsearch"]) for s in rounds)
    print(f"\nboth sides drew the same {args.trials} points: {'yes' if same else 'NO (the ratio compares other work)'}")
    for i, sides in enumerate(rounds, 1):
        trials = sides["covidsearch"].trials
        print(f"round {i}: covidsearch ran its {len(trials)} trials in {sum(t.first for t in trials)} worker "
              f"process(es); replaced: " + ("; ".join(f"after trial {k} {t.recycled}" for k, t in enumerate(trials)
                                                     if t.recycled) or "none"))
    print("\ncovidsearch's per-trial fixed cost by part, s (mean over trials and rounds; a worker process's first "
          "trial apart from the others):")
    _parts(rounds)
    plain_fixed = statistics.median(_mean([t.fixed for t in s["plain"].trials]) for s in rounds)
    print(f"\n(b)/(a) covidsearch / plain Keras Tuner, whole commands: {ratio:.2f}x "
          f"(target <= {RATIO_TARGET}x: {'MET' if ratio <= RATIO_TARGET else 'NOT MET'})")
    print(f"per-trial fixed cost, covidsearch: {fixed:.2f} s (target <= {FIXED_TARGET} s on CPU: "
          f"{'MET' if fixed <= FIXED_TARGET else 'NOT MET'}); plain Keras Tuner: {plain_fixed:.2f} s")


def _tracking_overhead(rounds: list[dict[str, Side]]) -> None:
    """(covidsearch - no-logging) / covidsearch per round, in wall and in CPU seconds: their mean with its 95% interval
    over the rounds, and the median. The target is met when the whole interval is at or under it, missed when the whole
    interval is above it; an interval across it says the rounds were too few for the machine's noise. Then the wall
    time's difference split: the trials' epochs (training slowed beside the search's logging) and the rest."""
    def share(sides: dict[str, Side], of: str) -> float:
        ours, bare = getattr(sides["covidsearch"], of), getattr(sides["no-logging"], of)
        return (ours - bare) / ours * 100

    print()
    for of, what in (("wall", "wall time"), ("cpu", "CPU seconds")):
        each = [share(sides, of) for sides in rounds]
        mean, low, high = _interval(each)
        verdict = ("MET" if high <= TRACKING_TARGET else "NOT MET" if low > TRACKING_TARGET
                   else "not settled: the interval spans it")
        print(f"tracking overhead in {what}, (covidsearch - no-logging) / covidsearch: mean {mean:+.1f}%, 95% interval "
              f"{low:+.1f}% to {high:+.1f}% over {len(each)} rounds; median {statistics.median(each):+.1f}%; each "
              f"{', '.join(f'{x:+.1f}%' for x in each)} (target <= {TRACKING_TARGET:.0f}%: {verdict})")
    for what, seconds in (("the trials' epochs", lambda side: sum(t.epochs for t in side.trials)),
                          ("the rest", lambda side: side.wall - sum(t.epochs for t in side.trials))):
        mean, low, high = _interval([seconds(s["covidsearch"]) - seconds(s["no-logging"]) for s in rounds])
        wall = _mean([s["covidsearch"].wall for s in rounds])
        print(f"of the difference in wall time, {what}: {mean:+.2f} s a search ({mean / wall:+.1%} of covidsearch's "
              f"wall time), 95% interval {low:+.2f} to {high:+.2f} s")
    from covidsearch import tracking

    timed = [(sum(t.parts.get(tracking.PART_MLFLOW, 0.0) for t in s["covidsearch"].trials),  # no-logging: none
              sum(t.parts.get(RECORDER, 0.0) for t in s["covidsearch"].trials), s["covidsearch"].wall) for s in rounds]
    print("as the trials timed it: notes for MLflow on the trials' path "
          + ", ".join(f"{path:.1f} s ({path / wall:.1%})" for path, _, wall in timed) + " of the search's wall time; "
          "the search's recorder beside the next trial " + ", ".join(f"{off:.1f} s" for _, off, _ in timed))
    for name in ("covidsearch", "no-logging"):
        print(f"{name}: worker processes replaced " + ", ".join(str(s[name].replaced) for s in rounds)
              + f"; a worker's memory after a trial {_mean([s[name].worker_mb for s in rounds]):.0f} MB on average")


def _interval(values: list[float]) -> tuple[float, float, float]:
    """The mean and its 95% t-interval (infinite for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    half = (stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1
            else float("inf"))
    return mean, mean - half, mean + half


def _same_points(plain: Side, ours: Side) -> bool:
    """Whether both sides trained the same hyperparameter values, trial by trial (values compared as text)."""
    def shown(values: dict[str, Any]) -> list[str]:
        return [f"{k}={float(values[k]):.6g}" for k in sorted(values) if not k.startswith("tuner/")]

    return [shown(t.values) for t in plain.trials] == [shown(t.values) for t in ours.trials]


def _parts(rounds: list[dict[str, Side]]) -> None:
    """Mean seconds of each part, for a worker's first trial and for the others, and the trials' epochs."""
    trials = [t for s in rounds for t in s["covidsearch"].trials]
    first, rest = [t for t in trials if t.first], [t for t in trials if not t.first]
    names = sorted({k for t in trials for k in t.parts}, key=lambda k: -_mean([t.parts.get(k, 0) for t in trials]))
    print(f"  {'part':<58} {'all':>6} {'first':>7} {'others':>7}")
    print(f"  {'(trials)':<58} {len(trials):>6} {len(first):>7} {len(rest):>7}")
    for name in names:
        print(f"  {name:<58} " + " ".join(f"{_mean([t.parts.get(name, 0) for t in group]):>6.2f}"
                                          for group in (trials, first, rest)))
    print(f"  {'fixed cost (span - epochs)':<58} " + " ".join(f"{_mean([t.fixed for t in group]):>6.2f}"
                                                              for group in (trials, first, rest)))
    print(f"  {'epochs (train_seconds + val_seconds)':<58} " + " ".join(f"{_mean([t.epochs for t in group]):>6.2f}"
                                                                        for group in (trials, first, rest)))


def warm_cache(data_dir: Path, cache: Path) -> None:
    """Every input size of the space decoded into the pixel cache, so no side's clock includes a decode."""
    from covidsearch import data

    dataset = data.scan(data_dir, cache_dir=cache, sizes=[(size, "rgb") for size in SIZES])
    for size in SIZES:
        data.arrays(dataset, size, "rgb", cache)


def main() -> None:
    """The three sides in turn, --rounds times, then one report, so they compare on the same machine and data."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                   help="which commands to run (the ratio needs plain and covidsearch, the overhead no-logging too)")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="skip the unreported two-trial run of each side before the rounds")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a hyperparameter on both sides (repeatable)")
    p.add_argument("--tutorial", action="store_true",
                   help="every trial the tutorial's ConvNet: " + ", ".join(TUTORIAL) + " pinned")
    p.add_argument("--recycle-every", type=int, metavar="N",
                   help="covidsearch sides: replace each worker process after N trials, never for its memory")
    p.add_argument("--cache-dir", type=Path, help="pixel cache to fill and share (default: a temporary one)")
    p.add_argument("--side", choices=["plain"], help=argparse.SUPPRESS)  # the plain side's own process
    p.add_argument("--project-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sets += list(TUTORIAL) if args.tutorial else []
    args.data = args.data.resolve()  # the sides run in folders of their own
    args.cache_dir = args.cache_dir and args.cache_dir.resolve()
    if "covidsearch" not in args.sides:
        p.error("--sides: every figure compares against the covidsearch side; name it")
    if args.recycle_every is not None and args.recycle_every < 1:
        p.error(f"--recycle-every: a number of trials, 1 or more, not {args.recycle_every}")
    if args.side == "plain":
        return plain_search(args.data, args.cache_dir, args.trials, args.epochs, args.sets, args.project_dir,
                            args.out)
    with tempfile.TemporaryDirectory(prefix="covidsearch-throughput-") as tmp:
        args.cache_dir = args.cache_dir or Path(tmp) / "cache"
        print(f"{os.cpu_count()} CPUs; " + ", ".join(f"{n} {version(n)}" for n in PACKAGES)
              + f"; load average {os.getloadavg()[0]:.1f}")
        print(f"data {args.data}; vanilla space, random search, seed {SEED}, {args.trials} trials of "
              f"{args.epochs} epoch(s), no baseline; {args.rounds} round(s)"
              + "".join(f"; --set {item}" for item in args.sets)
              + (f"; workers replaced after every {args.recycle_every} trials, never for memory"
                 if args.recycle_every else ""))
        started = time.perf_counter()
        warm_cache(args.data, args.cache_dir)
        print(f"pixel cache filled for {', '.join(map(str, SIZES))} px in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
        rounds = []
        order = [name for name in SIDES if name in args.sides]
        for name in order if args.warm_up else []:  # not reported: the first command of a fresh machine runs cold
            work = Path(tmp) / f"warm-up-{name}"
            work.mkdir()
            SIDES[name](argparse.Namespace(**{**vars(args), "trials": 2}), work)
        print("warm-up done" if args.warm_up else "no warm-up", file=sys.stderr)
        for i in range(args.rounds):
            sides = {}
            for name in order if i % 2 == 0 else order[::-1]:  # alternated, so a drift of the machine's speed cancels
                work = Path(tmp) / f"round{i + 1}-{name}"
                work.mkdir()
                sides[name] = SIDES[name](args, work)
                print(f"round {i + 1} {name}: {sides[name].wall:.0f} s (load average {os.getloadavg()[0]:.1f})",
                      file=sys.stderr)
            rounds.append(sides)
        report(rounds, args)


if __name__ == "__main__":
    main()
