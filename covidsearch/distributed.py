"""Scale out with Keras Tuner's own chief/worker engine (keras_tuner.src.distribute).

The chief serves its oracle over gRPC; a worker's tuner, built with KERASTUNER_TUNER_ID,
KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, asks it for trials and reports back.
covidsearch adds the address check, the worker id and a chief that stops when the search is done.
"""
from __future__ import annotations

import os
import re
import time
from concurrent import futures
from typing import Any

import grpc
from grpc import RpcError  # noqa: F401  (what a worker sees when the chief fails or goes away)
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.engine.oracle import synchronized

from . import SearchError, tracking
from .progress import Progress
from .server import listen_error

_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def address(text: str | None) -> tuple[str, int]:
    """HOST:PORT of the oracle, or a one-line error."""
    host, _, port = (text or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SearchError(f"--oracle {text!r}: expected HOST:PORT, e.g. 0.0.0.0:8000 on the chief (every interface) "
                          "and chief-host:8000 on a worker")
    return host, int(port)


def check_listen(where: str) -> None:
    """Before anything is recorded: the chief can listen at `where` (not taken, an address of this machine)."""
    host, port = address(where)
    error = listen_error(host.strip("[]"), port)
    if error:
        raise SearchError(f"cannot serve the oracle on {where}: {error}")


def worker_id(found: str) -> str:
    """A worker's tuner id, checked: the same id after a restart resumes the trial the chief holds for it, so it
    must be unique to one worker."""
    if not _WORKER_ID.fullmatch(found) or "chief" in found.lower():
        raise SearchError(f"worker id {found!r}: use letters, digits, '.', '_' or '-' (at most 63) and not the word "
                          "'chief' (Keras Tuner's name for the oracle's process); pass --worker-id")
    return found


def check_not_running(client: Any, search_run_id: str, worker: str) -> None:
    """Refuse a second live worker with an id that is training a trial now: both would train (and record) it."""
    live = tracking.live_trials(client, search_run_id, worker)
    if live:
        raise SearchError(f"worker id {worker} is training trial run {live[0]} of this search right now (on this "
                          "or another machine): give this worker another --worker-id")


def join(oracle: str | None, tuner_id: str) -> None:
    """Make every Keras Tuner tuner built from here on a worker of the chief at `oracle`."""
    host, port = address(oracle)
    os.environ.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=str(port))


class _Servicer(oracle_chief.OracleServicer):
    """Keras Tuner's oracle service, keeping the error that ends the search (too many failed trials in a row)."""

    error: RuntimeError | None = None

    def EndTrial(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method's name)
        try:
            return super().EndTrial(request, context)
        except RuntimeError as err:
            self.error = err
            raise


@synchronized
def _held(oracle: Any) -> list[str]:
    """Workers holding a trial, read under the oracle's lock (gRPC threads change the dict)."""
    return sorted(oracle.ongoing_trials)


def serve(oracle: Any, where: str, progress: Progress) -> None:
    """Serve the oracle until every trial has ended and every worker that asked has been told to stop."""
    host, port = address(where)
    oracle.verbose = 0  # workers show each trial; Keras Tuner's trial tables would repeat it here
    # One thread, as Keras Tuner does: its oracle lock is not released when an oracle call raises.
    # No SO_REUSEPORT: a second chief on the same port must fail, not share the workers.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
    servicer = _Servicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        raise SearchError(f"cannot serve the oracle on {where}: the port is taken or {host} is not an address of "
                          "this machine") from None
    server.start()
    progress.notice(f"oracle served at {where}: start workers with `covidsearch worker --oracle CHIEF_HOST:{port}` "
                    "and this search's data, space and search options")
    waiting: list[str] = []
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            if servicer.error is not None:
                raise servicer.error
            held = _held(oracle) if servicer.stop_triggered else []
            if held and held != waiting:
                progress.notice(f"every trial is handed out; waiting for worker(s) {', '.join(held)} to finish theirs "
                                "(if one died: restart it with its --worker-id, or restart this chief)")
            waiting = held
            time.sleep(1)
    finally:
        server.stop(grace=5)
