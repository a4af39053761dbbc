"""Keras Tuner project directories on this machine: one per search (or per worker of a distributed search),
locked while a process runs it, with the state that lets the same command resume it.
"""
from __future__ import annotations

import fcntl
import json
import secrets
import socket
from pathlib import Path
from typing import IO

from . import SearchError

STATE = "covidsearch.json"


def claim(directory: Path, prefix: str, resume: str) -> tuple[str, dict | None, IO]:
    """The unfinished search with this key to resume, or a new one; locked while this process runs it."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted((p for p in directory.glob(f"{prefix}-*") if (p / STATE).exists()),
                      key=lambda p: p.stat().st_mtime)
    if resume != "never":
        for path in reversed(existing):
            state = json.loads((path / STATE).read_text())
            lock = try_lock(path)
            if state["status"] == "running" and lock is not None:
                return path.name, state, lock
            if lock is not None:
                lock.close()
    if resume == "required":
        raise SearchError("nothing to resume: no unfinished (and not running) search with these settings here")
    number = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in directory.glob(f"{prefix}-*")
                      if p.name.rsplit("-", 1)[1].isdigit()), default=0)
    while True:  # another process may take a number at the same moment
        path = directory / f"{prefix}-{number}"
        try:
            path.mkdir()
        except FileExistsError:
            number += 1
            continue
        return path.name, None, try_lock(path)


def try_lock(path: Path) -> IO | None:
    """An exclusive lock on a project dir; None when another live process holds it."""
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / "lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def write_state(path: Path, search_run_id: str, status: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / STATE).write_text(json.dumps({"search_run_id": search_run_id, "status": status}))


def worker_id(directory: Path) -> str:
    """This project dir's default worker id: the host name and an id kept in the dir. Two workers on one machine,
    each with its own --project-dir (one per GPU), get two ids; a worker restarted on the same dir gets its own."""
    directory.mkdir(parents=True, exist_ok=True)
    kept = directory / "worker-id"
    try:
        with open(kept, "x") as out:  # the first worker on this dir picks the id
            out.write(secrets.token_hex(3))
    except FileExistsError:
        pass
    return f"{socket.gethostname().split('.')[0]}-{kept.read_text().strip()}"
