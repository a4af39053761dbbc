"""Worker processes: each trial is trained in a child process, so a crash, an out-of-memory kill or Keras
Tuner's memory growth across trials (keras-team/keras-tuner #395, #873) ends with that process.

The search side (`Pool`) and the worker side (`main`, run as `python -m covidsearch.workers`) speak
over one socket: the search sends a `Task`, the worker answers a `Reply`.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from . import held_stderr

if TYPE_CHECKING:
    from .trial import Plan, Spec


@dataclass
class Task:
    """One trial for a worker to train."""

    spec: Spec
    plan: Plan


@dataclass
class Reply:
    """A worker's answer: the trial's validation metrics, or why it failed."""

    metrics: dict[str, float] | None = None
    error: str | None = None


class Pool:
    """The worker processes of one trial slot; the next worker starts (imports Keras, opens the device) while
    the current trial trains, so its start-up hides where a core is free. `device_share` bounds the GPU memory
    of each of its processes."""

    def __init__(self, trials_per_worker: int = 1, device_share: float = 1.0):
        self.trials_per_worker, self.device_share = trials_per_worker, device_share
        self._current: tuple[subprocess.Popen, Connection] | None = None  # with trials left
        self._left = 0
        self._standby: tuple[subprocess.Popen, Connection] | None = None

    # A worker dies with the *thread* that started it (PR_SET_PDEATHSIG, see _die_with_parent), and the threads of
    # Tuner.search_in_parallel end one by one while another may still use a worker one of them started: every worker
    # is started from this one thread, which lives as long as the search process.
    _starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidsearch-worker-starter")

    def _spawn(self) -> tuple[subprocess.Popen, Connection]:
        """A worker process, started from the one long-lived starter thread."""
        return self._starter.submit(self._start).result()

    def _start(self) -> tuple[subprocess.Popen, Connection]:
        """Start a worker in a session of its own: Ctrl-C at the terminal reaches only the search process,
        which decides what an interrupt ends (and kills the workers)."""
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", __name__, str(theirs.fileno()), str(self.trials_per_worker),
                   str(self.device_share)]
        process = subprocess.Popen(command, pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        return process, Connection(ours.detach())

    def run(self, task: Task) -> Reply:
        """Run one trial in a worker; a worker that dies is a failed trial, not a failed search."""
        if self._current is None or self._left == 0:
            self._retire()
            self._current, self._left = self._standby or self._spawn(), self.trials_per_worker
            self._standby = self._spawn()
        process, conn = self._current
        self._left -= 1
        try:
            conn.send(task)
            reply = conn.recv()
        except (EOFError, OSError):
            self._current, self._left = None, 0
            return Reply(error=f"the worker process died (exit code {_wait(process)}: killed, or out of memory)")
        if self._left == 0:
            self._retire()
        return reply

    def _retire(self) -> None:
        if self._current is not None:
            _stop(*self._current)
            self._current = None

    def close(self) -> None:
        """Stop every worker, the standby and one still training (after an interrupt) included."""
        self._retire()
        if self._standby is not None:
            _stop(*self._standby)
            self._standby = None


def _stop(process: subprocess.Popen, conn: Connection) -> None:
    """Close a worker's pipe (an idle worker then exits by itself); kill it if it does not."""
    conn.close()
    if _wait(process) is None:
        process.kill()
        process.wait()


def _wait(process: subprocess.Popen, seconds: float = 5) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------- the worker side


def serve(conn: Connection, trials: int, device_share: float = 1.0) -> None:
    """A worker process's loop: train up to `trials` tasks sent over the pipe, answering each with a Reply."""
    _die_with_parent()
    # Take GPU memory as needed, up to this worker's share: a standby worker and the trials sharing
    # a GPU must not each grab JAX's default 75% (TensorFlow: grow on demand).
    os.environ.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_FORCE_GPU_ALLOW_GROWTH="true",
                      XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 * device_share:.3f}")
    with held_stderr():  # TensorFlow's start-up lines
        import keras
        import numpy as np

        from . import trial
    keras.ops.convert_to_tensor(np.zeros(1))  # start the accelerator runtime while still on standby
    for _ in range(trials):
        try:
            task: Task = conn.recv()
        except EOFError:  # the search ended or retired this worker before using it
            return
        conn.send(_answer(trial, task))


def _answer(trial: Any, task: Task) -> Reply:
    try:
        return Reply(metrics=trial.run(task.spec, task.plan))
    except trial.TrialFailed as err:
        return Reply(error=str(err))


def _die_with_parent() -> None:
    """On Linux, a worker whose search process is killed (kill -9) is killed too, never orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def main(argv: list[str]) -> None:
    """`python -m covidsearch.workers FD TRIALS DEVICE_SHARE`: serve trials on the inherited socket."""
    fd, trials, device_share = argv
    serve(Connection(int(fd)), int(trials), float(device_share))


if __name__ == "__main__":  # run as a program, the module's classes must still be covidsearch.workers' (pickling)
    from covidsearch.workers import main as serve_main

    serve_main(sys.argv[1:])
