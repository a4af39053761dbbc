"""What a user watches during `run`: trial i of N, epoch, best so far, elapsed and remaining.

On a terminal the epoch line updates in place; otherwise every line is plain (logs, CI);
`--quiet` shows nothing but errors and the final leaderboard.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO


def mode_for(stream: TextIO, quiet: bool) -> str:
    """'off' when quiet, 'tty' on a terminal, else 'plain'."""
    if quiet:
        return "off"
    return "tty" if stream.isatty() else "plain"


def clock(seconds: float) -> str:
    """h:mm:ss or m:ss, as a stopwatch shows time."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Search-level progress in the parent process."""

    def __init__(self, mode: str, total: int | None, objective: str, stream: TextIO | None = None):
        # sys.stderr as it is now, not as it was at import (a test runner swaps it)
        self.mode, self.total, self.objective, self.stream = mode, total, objective, stream or sys.stderr  # total None: a budget
        self.deadline: float | None = None  # monotonic time the budget ends, when there is one
        self.started = time.monotonic()
        self.done = 0
        self.best: float | None = None

    def say(self, text: str) -> None:
        """A permanent line (data summary, trial results, warnings)."""
        if self.mode != "off":
            print(("\r\033[K" if self.mode == "tty" else "") + text, file=self.stream, flush=True)

    def notice(self, text: str) -> None:
        """A line shown even with --quiet: something the user must know (a resume, a lost trial)."""
        print(("\r\033[K" if self.mode == "tty" else "") + text, file=self.stream, flush=True)

    def counter(self, what: str, every: float = 10.0) -> Callable[[int, int], None]:
        """A data.Report for a long job ("scan: 5,000 of 21,165 files, 410/s"): in place on a terminal, a line
        every `every` seconds otherwise, and the last one; a job done within the first interval shows nothing."""
        started = time.monotonic()
        shown = [started, False]  # when last shown, and whether anything was

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            due = now - shown[0] >= (1.0 if self.mode == "tty" else every)
            if self.mode == "off" or not (due or (done == total and shown[1])):
                return
            shown[:] = [now, True]
            text = f"{what}: {done:,} of {total:,} files, {done / max(now - started, 1e-9):.0f}/s"
            if self.mode == "tty" and done < total:
                print(f"\r\033[K{text}", end="", file=self.stream, flush=True)
            else:
                self.say(text)

        return report

    def trial_label(self, index: int) -> str:
        return f"trial {index}" if self.total is None else f"trial {index}/{self.total}"

    def finished(self, index: int, trial_id: str, value: float | None, text: str, maximise: bool) -> None:
        """Record a finished (or failed) trial and print its line with best-so-far and time left."""
        self.done = index
        if value is not None and math.isfinite(value):
            better = self.best is None or (value > self.best if maximise else value < self.best)
            self.best = value if better else self.best
        elapsed = time.monotonic() - self.started
        left = elapsed / max(self.done, 1) * max(self.total - self.done, 0) if self.total is not None else 0.0
        if self.deadline is not None:
            left = max(self.deadline - time.monotonic(), 0.0) if self.total is None else min(
                left, max(self.deadline - time.monotonic(), 0.0))
        best = "-" if self.best is None else f"{self.best:.4f}"
        self.say(f"{self.trial_label(index)} [{trial_id}] {text} | best {self.objective} {best} | "
                 f"elapsed {clock(elapsed)}, ~{clock(left)} left")


def epoch_line(mode: str, label: str, epoch: int, epochs: int, logs: dict, stream: TextIO = sys.stderr) -> None:
    """One epoch's figures, written by the worker process running the trial."""
    if mode == "off":
        return
    shown = " ".join(f"{k} {logs[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy",
                                                    "val_sensitivity_covid_19") if k in logs)
    text = f"{label} epoch {epoch + 1}/{epochs}: {shown}"
    if mode == "tty":
        print(f"\r\033[K{text}", end="", file=stream, flush=True)
    else:
        print(text, file=stream, flush=True)


def trial_notice(mode: str, label: str, text: str, stream: TextIO = sys.stderr) -> None:
    """A line the worker process running a trial must show even with --quiet (a target it could not reach)."""
    print(("\r\033[K" if mode == "tty" else "") + f"{label}: {text}", file=stream, flush=True)
