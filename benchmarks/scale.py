"""The full release on one machine (issue 15): 21,165 images, four classes, 299 px.

Makes a synthetic copy of the current COVID-19 Radiography Database release (Kaggle layout, 299 x 299
grayscale PNGs, COVID 3,616, Normal 10,192, Lung Opacity 6,012, Viral Pneumonia 1,345; smaller sizes
keep its proportions), then measures at --sizes (default 2,800, 10,000 and 21,165 images), each step in
a fresh process so its peak memory (VmHWM) is its own:
  decode    every file decoded once at 299 px RGB on every core, nothing kept: the limit of a scan
  scan      covidsearch's scan of a new dataset with a new cache (check, hash, fill the 299 px cache),
            as its ratio to decode (target <= 1.3x), with the progress it prints; decode and scan
            alternate for --scan-rounds rounds (default 3), and the ratio is the median of the rounds'
            ratios, since on a shared machine either one alone moves by a fifth between runs; the
            ratio of their CPU seconds (all threads) is printed beside it, the work each one does
  leakage   the split and the exact near-duplicate check across its splits (target <= 60 s)
  epoch     one covidsearch search of one 1-epoch trial at 299 px, four classes: trial time, the
            trial's peak memory beyond the same trial on 400 images, against the bytes of the pixels
            it reads (target <= 1.3x), and the search process's peak beyond a process that has only
            imported TensorFlow, Keras Tuner and MLflow (target <= 1 GB)
  pair      at the largest size, two such trials at once (--workers-per-gpu 2), with the lowest
            MemAvailable seen (they must fit in this machine's memory)
and, on the smallest size, promotes the 4-class search's trial and writes its report. The images are
synthetic (a body, two lungs, a random smooth field per image so that no two are near duplicates), not
X-rays: what is measured is the cost of the data path, not a model's quality. Figures are printed:

    .venv/bin/python benchmarks/scale.py [--dir /tmp/covidsearch-scale] [--sizes 2800 10000 21165] [--scan-rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidsearch import data, demo  # noqa: E402

RELEASE = {"COVID": 3616, "Normal": 10192, "Lung_Opacity": 6012, "Viral Pneumonia": 1345}  # Kaggle folders
CLASSES = ["COVID-19", "Normal", "Lung_Opacity", "Viral Pneumonia"]
SIZE = 299
FEW = 400  # the "few images" trial whose peak memory is the base of the others
SPACE = """
[search]
tuner = "random"
max_trials = 1
max_epochs = 1
objective = "val_loss"

[fixed]
model = "convnet"
color_mode = "rgb"
input_size = 299
filters = 8
dense_units = 16
batch_size = 64
learning_rate = 0.001
val_fraction = 0.2
test_per_class = 10
patience = 5
min_delta = 0.01

[hyperparameters]  # two points, for the two trials of the pair step
dropout = { type = "choice", values = [0.5, 0.4], default = 0.5 }
"""


def _image(kind: str, seed: int) -> Image.Image:
    """A synthetic X-ray-like picture with a smooth random field of its own (distinct difference hash)."""
    rng = np.random.default_rng(seed)
    body = demo.synthetic_xray({"COVID": "COVID-19"}.get(kind, kind), SIZE, rng).astype(np.float32)
    field = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), "L").resize((SIZE, SIZE), Image.BICUBIC)
    return Image.fromarray(np.clip(0.6 * body + 0.4 * np.asarray(field, np.float32), 0, 255).astype(np.uint8), "L")


def generate(root: Path, total: int) -> Path:
    """The release's folders with `total` images in its class proportions (kept between runs)."""
    counts = {kind: round(n * total / sum(RELEASE.values())) for kind, n in RELEASE.items()}
    counts["Normal"] += total - sum(counts.values())
    base = root / f"n{total}" / "COVID-19_Radiography_Dataset"
    jobs = [(base / kind / "images" / f"{kind}-{i + 1}.png", kind, hash((kind, i)) & 0xFFFFFFFF)
            for kind, n in counts.items() for i in range(n)]
    todo = [job for job in jobs if not job[0].exists()]
    for folder in {job[0].parent for job in todo}:
        folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda job: _image(job[1], job[2]).save(job[0]), todo))
    return root / f"n{total}"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_decode(root: Path) -> dict:
    files = sorted(str(p) for p in root.rglob("*.png"))
    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in pool.map(lambda f: data.decode(f, SIZE, "rgb"), files, chunksize=16):
            pass
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "images": len(files),
            "peak_mb": _peak_mb()}


def step_scan(root: Path, cache: Path) -> dict:
    from covidsearch.progress import Progress

    started, cpu = time.perf_counter(), time.process_time()
    dataset = data.scan(root, CLASSES, cache, sizes=[(SIZE, "rgb")], report=Progress("plain", 1, "").counter("scan"))
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "images": len(dataset.samples), "peak_mb": _peak_mb()}


def step_leakage(root: Path, cache: Path) -> dict:
    dataset = data.scan(root, CLASSES, cache)
    started = time.perf_counter()
    parts = data.split(dataset, 28, 0.2, 10)
    found = data.leakage(dataset, parts)
    return {"seconds": time.perf_counter() - started, "exact": found["exact_duplicates"],
            "near": found["near_duplicates"], "peak_mb": _peak_mb()}


def step_imports() -> dict:
    import keras_tuner  # noqa: F401
    import mlflow  # noqa: F401
    import tensorflow  # noqa: F401

    return {"peak_mb": _peak_mb()}


def step_epoch(root: Path, cache: Path, store: Path, workers: int) -> dict:
    from covidsearch import search, tracking

    space = store / "scale.toml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(SPACE)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    started = time.perf_counter()
    with sampled_memory() as lowest:
        result = search.run(search.Options(data=str(root), space=str(space), classes=CLASSES, tracking_uri=uri,
                                           project_dir=str(store / "tuner"), cache_dir=str(cache), resume="never",
                                           max_trials=workers, workers_per_gpu=workers, progress="plain"))
    wall = time.perf_counter() - started
    runs = tracking.trial_runs(tracking.client(uri), result.search_run_id)
    params = tracking.client(uri).get_run(result.search_run_id).data.params
    images = int(params["train_images"]) + int(params["val_images"]) + int(params["test_images"])
    return {"seconds": wall, "trial_seconds": [r.data.metrics.get("trial_seconds") for r in runs],
            "worker_peak_mb": [r.data.metrics.get(tracking.WORKER_PEAK) for r in runs],
            "statuses": [r.info.status for r in runs], "pixel_mb": images * SIZE * SIZE * 3 / 2**20,
            "search_peak_mb": _peak_mb(), "lowest_available_mb": lowest[0], "search_run": result.search_run_id,
            "trial_run": runs[0].info.run_id if runs else None, "uri": uri}


class sampled_memory:
    """The lowest MemAvailable seen while the block runs, in MB (a list, filled on exit)."""

    def __enter__(self) -> list[float]:
        self.lowest, self.stop = [float("inf")], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self.lowest

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    self.lowest[0] = min(self.lowest[0], int(line.split()[1]) / 1024)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def child(*args: str) -> dict:
    """Run one step in a fresh process; its JSON answer is its last stdout line."""
    done = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"step {args} failed:\n{done.stderr[-3000:]}")
    for line in done.stderr.splitlines():
        if line.startswith("scan:"):
            print(f"    {line}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/covidsearch-scale")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2800, 10000, 21165])
    parser.add_argument("--scan-rounds", type=int, default=3, help="decode and scan in turn, this many times a size")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        name, *rest = args.step
        steps = {"decode": lambda: step_decode(Path(rest[0])), "scan": lambda: step_scan(Path(rest[0]), Path(rest[1])),
                 "leakage": lambda: step_leakage(Path(rest[0]), Path(rest[1])), "imports": step_imports,
                 "epoch": lambda: step_epoch(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]))}
        print(json.dumps(steps[name]()))
        return
    if args.scan_rounds < 1:
        parser.error("--scan-rounds: at least 1")
    report(Path(args.dir), sorted(args.sizes), args.scan_rounds)


def report(work: Path, sizes: list[int], scan_rounds: int) -> None:
    print(f"machine: {os.cpu_count()} cores; images {SIZE} px, classes {', '.join(CLASSES)}")
    started = time.perf_counter()
    roots = {n: generate(work, n) for n in [FEW, *sizes]}
    print(f"generated {sum(sizes) + FEW:,} images in {time.perf_counter() - started:.0f} s under {work}")
    base = child("imports")["peak_mb"]
    few = child("epoch", str(roots[FEW]), *_fresh(work, FEW), "1")
    print(f"baseline: a process with TensorFlow, Keras Tuner and MLflow imported peaks at {base:.0f} MB; "
          f"a 1-epoch trial on {FEW} images peaks at {few['worker_peak_mb'][0]:.0f} MB")
    rows = []
    for n in sizes:
        decoded, scanned, cache, store = _scan_rounds(work, roots[n], n, scan_rounds)
        leak = child("leakage", str(roots[n]), str(cache))
        epoch = child("epoch", str(roots[n]), str(cache), str(store), "1")
        rows.append((n, decoded, scanned, leak, epoch))
    print(f"\n{'images':>7} {'decode s':>9} {'scan s':>7} {'ratio':>6} {'leak s':>7} {'near':>5} {'epoch s':>8} "
          f"{'trial MB':>9} {'pixel MB':>9} {'x pixels':>8} {'search MB':>10} {'scan ms/img':>12} "
          f"{'epoch ms/img':>13} {'trial KB/img':>13}")
    for n, decoded, scanned, leak, epoch in rows:
        trial_mb = epoch["worker_peak_mb"][0] - few["worker_peak_mb"][0]
        ratio = statistics.median(s["seconds"] / d["seconds"] for d, s in zip(decoded, scanned))
        scan = statistics.median(s["seconds"] for s in scanned)
        print(f"{n:>7,} {statistics.median(d['seconds'] for d in decoded):>9.1f} {scan:>7.1f} {ratio:>6.2f} "
              f"{leak['seconds']:>7.1f} {leak['near']:>5} {epoch['trial_seconds'][0]:>8.1f} {trial_mb:>9.0f} "
              f"{epoch['pixel_mb']:>9.0f} {trial_mb / epoch['pixel_mb']:>8.2f} {epoch['search_peak_mb'] - base:>10.0f} "
              f"{1000 * scan / n:>12.2f} {1000 * epoch['trial_seconds'][0] / n:>13.2f} "
              f"{1024 * trial_mb / n:>13.1f}")
    print("\nscan / decode by round (decode s, scan s, ratio), the ratio above their median; then in CPU seconds of "
          "all their threads (the work, which the machine's changing speed moves less than the clock):")
    for n, decoded, scanned, _, _ in rows:
        for unit in ("seconds", "cpu"):
            print(f"{n:>7,} {unit:<8} " + "; ".join(f"{d[unit]:.1f} {s[unit]:.1f} {s[unit] / d[unit]:.2f}"
                                                     for d, s in zip(decoded, scanned))
                  + f"; median {statistics.median(s[unit] / d[unit] for d, s in zip(decoded, scanned)):.2f}")
    largest = sizes[-1]
    pair = child("epoch", str(roots[largest]), str(work / f"cache-{largest}"), str(work / f"pair-{largest}"), "2")
    print(f"\ntwo trials at once on {largest:,} images: {pair['statuses']}, worker peaks "
          + ", ".join(f"{mb:.0f} MB" for mb in pair["worker_peak_mb"])
          + f" (memory-mapped pixels are shared), lowest MemAvailable {pair['lowest_available_mb']:.0f} MB")
    four = child("epoch", str(roots[sizes[0]]), str(work / f"cache-{sizes[0]}"), str(work / "four"), "1")
    _four_classes(four)


def _scan_rounds(work: Path, root: Path, n: int, rounds: int) -> tuple[list[dict], list[dict], Path, Path]:
    """Decode, then scan into a new cache, `rounds` times in turn: their wall and CPU seconds, and the last round's
    cache and an empty store for the steps after."""
    decoded, scanned = [], []
    for _ in range(rounds):
        cache, store = _fresh(work, n)
        decoded.append(child("decode", str(root)))
        scanned.append(child("scan", str(root), str(cache)))
    return decoded, scanned, cache, store


def _fresh(work: Path, n: int) -> tuple[Path, Path]:
    """An empty cache and store for one size."""
    cache, store = work / f"cache-{n}", work / f"store-{n}"
    for folder in (cache, store):
        shutil.rmtree(folder, ignore_errors=True)
    return cache, store


def _four_classes(four: dict) -> None:
    """Promote the 4-class trial and write its report, as a user would."""
    cli = [sys.executable, "-m", "covidsearch.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        promoted = subprocess.run([*cli, "promote", four["trial_run"], "--name", "scale-4class", "--tracking-uri",
                                   four["uri"]], capture_output=True, text=True)
        page = Path(tmp) / "report.html"
        reported = subprocess.run([*cli, "report", four["search_run"], "--out", str(page), "--tracking-uri",
                                   four["uri"]], capture_output=True, text=True)
        classes = [c for c in CLASSES if c in page.read_text()] if page.exists() else []
    print(f"4-class search: trial {four['statuses'][0]}; promote rc {promoted.returncode} "
          f"({promoted.stdout.strip().splitlines()[-1] if promoted.stdout.strip() else promoted.stderr[-200:]}); "
          f"report rc {reported.returncode}, names {len(classes)} of 4 classes")


if __name__ == "__main__":
    main()
