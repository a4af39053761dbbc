"""Worker processes: trials are trained in long-lived child processes, so a crash or an out-of-memory kill ends
with that process (it fails only its trial), and each worker is replaced, as gunicorn's max-requests or Ray's
max_calls replace theirs, once it has run `trials_per_worker` trials or its memory has grown past a bound: Keras
Tuner's memory growth across trials (keras-team/keras-tuner #395, #873; TensorFlow keeps every trained model's
variables, tensorflow/tensorflow #61791, whose buffers a worker empties after each trial) then never builds up,
and a trial pays for its training, not for a process start.

The search side (`Pool`) and the worker side (`serve`, started with BOOT) speak over one
socket: the search sends a `Task`, the worker sends the trial's notes for its run as they come (tracking.Note: its
epochs' metrics, which the search writes to the store, so that no worker opens it) and answers a `Reply`; a new standby
is first sent a `Warm`.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import exit_at_once, held_stderr

if TYPE_CHECKING:
    from .tracking import Note
    from .trial import Plan, Spec

TRIALS_PER_WORKER = 20  # trials a worker runs before it is replaced, whatever its memory
MAX_GROWTH = 10.0  # percent: a worker whose memory after a trial grew this much past its baseline is replaced


# A worker imports the covidsearch the search process runs, wherever it is started from: `python -m` would put the
# working directory first on sys.path, so a checkout (or a half-edited copy) there would train the trials instead.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
BOOT = "import sys; sys.path[0] = sys.argv[1]; from covidsearch.workers import main; main(sys.argv[2:])"
HUGE_PAGES = "glibc.malloc.hugetlb"  # glibc's tunable: 1 asks the kernel for transparent huge pages for malloc's blocks


@dataclass
class Task:
    """One trial for a worker to train."""

    spec: Spec
    plan: Plan
    sent: float = 0.0  # when the search sent it (epoch seconds): the worker's start-up it waited for shows


@dataclass
class Warm:
    """For a standby: rehearse what a process pays on its first trial only."""


@dataclass
class Reply:
    """A worker's answer: the trial's validation metrics, or why it failed; and which worker process ran it."""

    metrics: dict[str, float] | None = None
    error: str | None = None
    detail: str | None = None  # the error's traceback
    pid: int = 0  # the worker process
    nth: int = 0  # the worker's n-th trial (1: its first)
    rss_mb: float | None = None  # the worker's resident memory after the trial, Keras state cleared
    peak_mb: float | None = None  # the worker's peak memory so far (VmHWM): a new peak is a trial bigger than before
    waited: float = 0.0  # seconds the task waited for the worker to be ready: start-up the standby did not hide
    recycled: str | None = None  # why the pool replaced the worker after this trial


@dataclass
class Memory:
    """A worker's memory after its good trials (resident, and peak so far), read for a leak. A trial whose peak
    jumps past the previous trial's by more than the bound is a bigger trial: what it leaves behind (pages the
    allocator keeps) is its size, not a leak, and it becomes the baseline. A leak creeps, trial after trial: the
    memory after a trial, or the peak, ends up past the baseline's by more than the bound."""

    max_growth: float  # percent
    base_rss: float | None = None
    base_peak: float | None = None
    last_peak: float | None = None

    def after(self, rss: float | None, peak: float | None) -> str | None:
        """Note a good trial's memory; why the worker must be replaced now, or None."""
        bound = 1 + self.max_growth / 100
        if self.base_rss is None or (peak and self.last_peak and peak > self.last_peak * bound):
            self.base_rss, self.base_peak = rss, peak
        self.last_peak = peak
        for what, now, base in (("memory", rss, self.base_rss), ("peak memory", peak, self.base_peak)):
            if now and base and now > base * bound:
                return (f"{what} {now:.0f} MB, {(now / base - 1) * 100:.0f}% above the {base:.0f} MB after its "
                        f"largest trial (bound {self.max_growth:g}%)")
        return None


# How Popen starts a process in a process group of its own: Python 3.11's process_group, before it setpgrp in the child
OWN_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


@dataclass
class _Worker:
    """A worker process as the pool sees it: its pipe, the trials it ran, its memory."""

    process: subprocess.Popen
    conn: Connection
    memory: Memory
    trials: int = 0


def recycle_reason(trials: int, trials_per_worker: int) -> str | None:
    """Replaced after `trials_per_worker` trials whatever its memory, as gunicorn's max-requests: a leak too slow
    for the memory bound is paid back by a process start only when it has added up."""
    if trials >= trials_per_worker:
        return f"after {trials} trial{'s' if trials > 1 else ''}"
    return None


def environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: the search's, with glibc's malloc asking for transparent huge pages (where Linux has
    them in madvise mode, the common default) unless the user set that tunable. A CPU training step maps its tensors'
    buffers, tens of MB each, afresh; faulted in 4 KB at a time, they cost three times the system CPU, and made a
    20-trial ConvNet search last 1.4 times as long here (benchmarks/RESULTS.md)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if f"{HUGE_PAGES}=" in tunables:
        return dict(environ)
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGES}=1"]))}


class Pool:
    """The worker processes of one trial slot: the current worker, which runs trial after trial, and a standby
    started (Keras imported, the device opened) while the current one trains, which takes over when the current one
    is recycled or dies. The standby starts with the current worker's second trial: its start-up then takes no cores
    from the first trial, which waits on the current worker's own start-up, and a one-trial search starts no second
    process. `device_share` bounds the GPU memory of each of its processes."""

    def __init__(self, trials_per_worker: int = TRIALS_PER_WORKER, device_share: float = 1.0,
                 max_growth: float = MAX_GROWTH):
        self.trials_per_worker, self.device_share, self.max_growth = trials_per_worker, device_share, max_growth
        self._current: _Worker | None = None
        self._standby: _Worker | None = None

    # A worker dies with the *thread* that started it (PR_SET_PDEATHSIG, see _die_with_parent), and the threads of
    # Tuner.search_in_parallel end one by one while another may still use a worker one of them started: every worker
    # is started from this one thread, which lives as long as the search process.
    _starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidsearch-worker-starter")

    def _spawn(self) -> _Worker:
        """A worker process, started from the one long-lived starter thread."""
        return self._starter.submit(self._start).result()

    def _start(self) -> _Worker:
        """Start a worker in a process group of its own, so that Ctrl-C at the terminal reaches only the search
        process, which decides what an interrupt ends (and kills the workers). Not in a session of its own: Linux
        shares the CPU fairly between sessions first (autogroups), so the search's recorder, at idle priority
        within its session, took a quarter of the cores from a training worker in another one."""
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", BOOT, str(PACKAGE_ROOT), str(theirs.fileno()), str(self.device_share)]
        process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                   env=environment(os.environ), **OWN_GROUP)
        theirs.close()
        return _Worker(process, Connection(ours.detach()), Memory(self.max_growth))

    def prepare(self) -> None:
        """Start the first worker now, so that it imports Keras while the search scans its data and opens its record,
        not while the first trial waits."""
        if self._current is None and self._standby is None:
            self._standby = self._spawn()

    def run(self, task: Task, write: Callable[[Note], None], sent: Callable[[], None] = lambda: None) -> Reply:
        """Run one trial in the current worker, calling `sent` once the worker has it and `write` with each note
        it sends for the trial's run; a worker that dies is a failed trial, not a failed search."""
        worker = self._current or self._take_standby()
        if worker.trials:
            self._keep_standby()
        worker.trials += 1
        try:
            with _lost_if_closed():
                worker.conn.send(replace(task, sent=time.time()))
            sent()
            reply = _reply(worker.conn, write)
        except _Lost:
            code = _wait(worker.process)
            self._retire()
            return Reply(error=f"the worker process died (exit code {code}: killed, or out of memory)",
                         pid=worker.process.pid, nth=worker.trials)
        except BaseException:  # a note could not be written, or an interrupt: the trial's worker must not go on
            worker.process.kill()
            self._retire()
            raise
        # a trial that failed early says nothing of memory
        leak = worker.memory.after(reply.rss_mb, reply.peak_mb) if reply.error is None else None
        reply.recycled = recycle_reason(worker.trials, self.trials_per_worker) or leak
        if reply.recycled:
            self._retire()
        return reply

    def _take_standby(self) -> _Worker:
        """The standby becomes the current worker (a fresh one if there is none yet)."""
        self._current, self._standby = self._standby or self._spawn(), None
        return self._current

    def _keep_standby(self) -> None:
        """A standby behind the current worker, warming up while the next trial trains."""
        if self._standby is None:
            self._standby = self._spawn()
            self._standby.conn.send(Warm())

    def _retire(self) -> None:
        if self._current is not None:
            _stop(self._current)
            self._current = None

    def close(self) -> None:
        """Stop every worker, the standby and one still training (after an interrupt) included."""
        self._retire()
        if self._standby is not None:  # it holds no trial: it need not finish starting up first
            self._standby.process.kill()
            self._standby.process.wait()
            self._standby = None


class _Lost(Exception):
    """The worker's end of the pipe closed: the worker died."""


@contextlib.contextmanager
def _lost_if_closed() -> Iterator[None]:
    """The pipe's own errors as _Lost, so that an OSError of the store's while it writes a note (a full disk, a
    tracking server gone) fails the trial with that error, not as a dead worker."""
    try:
        yield
    except (EOFError, OSError) as err:
        raise _Lost from err


def _reply(conn: Connection, write: Callable[[Note], None]) -> Reply:
    """The worker's reply to its task, the notes it sends before it written as they come."""
    while True:
        with _lost_if_closed():
            message = conn.recv()
        if isinstance(message, Reply):
            return message
        write(message)


def _stop(worker: _Worker) -> None:
    """Close a worker's pipe (an idle worker then exits by itself); kill it if it does not."""
    worker.conn.close()
    if _wait(worker.process) is None:
        worker.process.kill()
        worker.process.wait()


def _wait(process: subprocess.Popen, seconds: float = 5) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------- the worker side


def serve(conn: Connection, device_share: float = 1.0) -> None:
    """A worker process's loop: train the tasks sent over the pipe until the search closes it, answering each with
    a Reply, and leave no Keras state of one trial to the next."""
    _die_with_parent()
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group's writes to a `stty tostop` terminal go on
    # Take GPU memory as needed, up to this worker's share: a standby worker and the trials sharing
    # a GPU must not each grab JAX's default 75% (TensorFlow: grow on demand).
    os.environ.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_FORCE_GPU_ALLOW_GROWTH="true",
                      XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 * device_share:.3f}")
    with held_stderr():  # TensorFlow's start-up lines
        import keras
        import numpy as np

        from . import trial
    keras.ops.convert_to_tensor(np.zeros(1))  # start the accelerator runtime while still on standby
    settle()
    served, rehearsed = 0, False
    while True:
        try:
            task: Task | Warm = conn.recv()
        except EOFError:  # the search ended or retired this worker
            exit_at_once(0)  # its last trial answered, the worker holds nothing to save
        if isinstance(task, Warm):
            trial.rehearse()
            settle()
            rehearsed = True
            continue
        waited, served = max(0.0, time.time() - task.sent), served + 1
        reply = _answer(trial, task, conn.send)
        keras.backend.clear_session()  # and a garbage collection: the trial's model is freed before memory is read
        if served == 1 and not rehearsed:  # a first worker's first trial was its rehearsal: collections after it
            settle()  # walked what that trial started for good (the runtime's), 0.1 s a trial
        try:
            conn.send(replace(reply, pid=os.getpid(), nth=served, rss_mb=_status_mb("VmRSS"),
                              peak_mb=_status_mb("VmHWM"), waited=waited))
        except BrokenPipeError:  # the search was interrupted while this trial trained: no one takes its result
            exit_at_once(0)


def _answer(trial: Any, task: Task, send: Callable[[Note], None]) -> Reply:
    try:
        with _freed_variables():
            return Reply(metrics=trial.run(task.spec, task.plan, send))
    except trial.TrialFailed as err:
        return Reply(error=str(err), detail=err.detail)


@contextlib.contextmanager
def _freed_variables() -> Iterator[None]:
    """Empty every TensorFlow variable the block creates when it ends. TensorFlow keeps the variables that a compiled
    Keras optimizer step updated alive after their model is gone (tensorflow/tensorflow #61791; graphs of the step
    hold them): the model's weights and the optimizer's slots, three times the model's size, every trial. Emptied,
    their buffers are freed: a trial of the tutorial's ConvNet then leaves about 30 MB behind instead of 90."""
    import keras

    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    created: list[Any] = []

    def kept(next_creator: Any, **kwargs: Any) -> Any:
        variable = next_creator(**kwargs)
        created.append(variable)
        return variable

    try:
        with tf.variable_creator_scope(kept):
            yield
    finally:
        for variable in created:
            tf.raw_ops.AssignVariableOp(resource=variable.handle, value=tf.zeros([0], variable.dtype),
                                        validate_shape=False)


def settle() -> None:
    """Collect garbage, then exempt what is alive from later collections: the module state of TensorFlow, Keras and
    MLflow is a million objects, which every full collection would walk again (0.3 s each, in a worker after each
    trial, in the search process while its recorder draws a trial's figures, holding the GIL)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def settled() -> Iterator[None]:
    """settle() for a block of a process that outlives it (the search's may be a user's notebook): what was alive
    at its start can be collected again once it ends, so that one search after another does not keep each one's
    objects for good."""
    settle()
    try:
        yield
    finally:
        gc.unfreeze()


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc (VmRSS: resident now, what a leak grows; VmHWM: its peak); None
    where /proc does not say."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def _die_with_parent() -> None:
    """On Linux, a worker whose search process is killed (kill -9) is killed too, never orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def main(argv: list[str]) -> None:
    """The worker side (BOOT): serve trials on the inherited socket FD."""
    fd, device_share = argv
    serve(Connection(int(fd)), float(device_share))
