"""Does the search's idle-priority recorder leave the cores to a training worker? (issue 12)

The search process logs a trial's record on a thread under Linux's SCHED_IDLE policy (recorder.py), so that it runs
only on what the next trial's training leaves idle. Linux first shares the CPU fairly between sessions (autogroups,
/proc/sys/kernel/sched_autogroup_enabled), and only then by priority within each: a worker in a session of its own
(`start_new_session`, as covidsearch started them before) competes with the whole search process, idle thread and
all, as an equal. This script measures that, with no Keras: two busy child processes (the training) count for
--seconds, alone and then beside an idle-priority busy thread of this process (the recorder), started either way:

    .venv/bin/python benchmarks/idle_priority.py [--seconds 6] [--rounds 3]

It prints the children's work beside the thread as a fraction of their work alone, per way and round (1.00: the
thread took nothing from them). Printed, never asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covidsearch import workers  # noqa: E402  (the repo's covidsearch, wherever this is run from; no Keras)

COUNT = """
import sys, time
end, n = time.perf_counter() + float(sys.argv[1]), 0
while time.perf_counter() < end:
    n += 1
print(n)
"""  # a busy child: how far it counts is the CPU it got
WAYS: dict[str, dict[str, Any]] = {"own session (before)": {"start_new_session": True},
                                   "own process group, the search's session (now)": workers.OWN_GROUP}


def children_work(way: dict[str, Any], seconds: float, beside: bool) -> int:
    """What two busy children count in `seconds`, with or without an idle-priority busy thread in this process."""
    stop = threading.Event()
    thread = threading.Thread(target=_idle_spin, args=(stop,)) if beside else None
    if thread:
        thread.start()
    children = [subprocess.Popen([sys.executable, "-c", COUNT, str(seconds)], stdout=subprocess.PIPE, text=True,
                                 **way) for _ in range(2)]
    work = sum(int(child.communicate()[0]) for child in children)
    stop.set()
    if thread:
        thread.join()
    return work


def _idle_spin(stop: threading.Event) -> None:
    """The recorder's stand-in: busy, under SCHED_IDLE as recorder._yield_to_training puts it (importing the
    recorder would import Keras)."""
    os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    while not stop.is_set():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the children count, each time")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("idle_priority.py: SCHED_IDLE and autogroups are Linux's")
    autogroups = Path("/proc/sys/kernel/sched_autogroup_enabled")
    on = autogroups.exists() and autogroups.read_text().strip() == "1"
    print(f"{os.cpu_count()} CPUs; autogroups {'on' if on else 'off'}")
    fractions: dict[str, list[float]] = {name: [] for name in WAYS}
    for round_ in range(1, args.rounds + 1):
        for name, way in WAYS.items():
            alone = children_work(way, args.seconds, beside=False)
            fractions[name].append(children_work(way, args.seconds, beside=True) / alone)
            print(f"round {round_}, {name}: the children's work beside the idle thread {fractions[name][-1]:.2f} "
                  "of alone")
    for name, values in fractions.items():
        print(f"{name}: median {statistics.median(values):.2f} of alone over {len(values)} rounds")


if __name__ == "__main__":
    main()
