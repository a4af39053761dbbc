"""Does a CPU epoch gain from the workers' huge pages? (issue 12)

covidsearch starts its workers with glibc's malloc asking for transparent huge pages (workers.environment:
GLIBC_TUNABLES=glibc.malloc.hugetlb=1). A CPU training step maps its tensors' buffers afresh, tens of MB each for the
tutorial's ConvNet at batch 250, and the kernel otherwise fills them one 4 KB page fault at a time. This script trains
the tutorial's ConvNet (50 px, 32 filters, 256 dense units, batch 250) on random images as many as the real data's
training split, in a fresh process per setting (the tunable is read when a process starts), the two settings
alternating, and prints per round and setting the median epoch after the first, the page faults and system CPU per
epoch, and the process's peak memory; then the ratio of epoch time with huge pages to without:

    .venv/bin/python benchmarks/huge_pages.py [--rounds 3] [--epochs 4] [--images 2144]

The whole search's gain is measured by throughput.py with the tunable off for one run
(GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns it off for covidsearch's workers). Printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from covidsearch import workers  # noqa: E402

NO_TUNABLES = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
SETTINGS = {"4 KB pages": f"{workers.HUGE_PAGES}=0",  # a user's own setting: it wins over the workers' default
            "huge pages": workers.environment(NO_TUNABLES)["GLIBC_TUNABLES"]}  # what a search gives its workers


def train(epochs: int, images: int) -> dict[str, float]:
    """The tutorial ConvNet's epochs in this process: median epoch after the first (compile), faults, system CPU."""
    import numpy as np

    from covidsearch import models

    config = {"model": "convnet", "input_size": 50, "filters": 32, "dense_units": 256, "dropout": 0.5,
              "learning_rate": 1e-3}
    model = models.build(config, 3)
    models.compile_model(model, config, config["learning_rate"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (images, *model.input_shape[1:])).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, images)]
    seconds, faults, system = [], [], []
    for _ in range(epochs):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        model.fit(x, y, batch_size=250, epochs=1, verbose=0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        seconds.append(time.perf_counter() - started)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    return {"epoch_s": statistics.median(seconds[1:]), "faults": statistics.median(faults[1:]),
            "system_s": statistics.median(system[1:]),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measured(setting: str, epochs: int, images: int) -> dict[str, float]:
    """`train` in a fresh process started with `setting` as its glibc tunables."""
    env = {**os.environ, "GLIBC_TUNABLES": setting, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, __file__, "--child", "--epochs", str(epochs), "--images", str(images)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"huge_pages.py: the {setting} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=2144)  # the real data's training split (2,800 images)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch compiles and is not counted")
    if args.child:
        print(json.dumps(train(args.epochs, args.images)))
        return
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"{os.cpu_count()} CPUs; transparent huge pages: {mode.read_text().strip() if mode.exists() else 'none'}")
    print(f"{'round':>5}  {'setting':<11} {'epoch s':>8} {'faults':>9} {'system s':>9} {'peak MB':>8}")
    ratios = []
    for n in range(1, args.rounds + 1):
        order = list(SETTINGS.items()) if n % 2 else list(reversed(SETTINGS.items()))
        results = {}
        for name, setting in order:
            results[name] = measured(setting, args.epochs, args.images)
            r = results[name]
            print(f"{n:>5}  {name:<11} {r['epoch_s']:>8.2f} {r['faults']:>9.0f} {r['system_s']:>9.2f} "
                  f"{r['peak_mb']:>8.0f}", flush=True)
        ratios.append(results["huge pages"]["epoch_s"] / results["4 KB pages"]["epoch_s"])
    print(f"epoch time with huge pages / without: {statistics.median(ratios):.2f}x "
          f"(median of {len(ratios)} rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
