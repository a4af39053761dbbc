"""`covidsearch server`: one MLflow tracking server for a team and its distributed searches.

Runs live in a database (SQLite, or PostgreSQL for many writers); artifacts are uploaded and
downloaded through the server (--serve-artifacts), so chiefs and workers need no access to where
they are kept (a directory on the server, or s3:// such as MinIO).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from . import UserError, tracking

DEFAULT_DIR = tracking.STORE_DIR / "server"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY = ("0.0.0.0", "::")


class ServerError(UserError, RuntimeError):
    """The tracking server cannot start; shown as a one-line error."""


@dataclass
class Config:
    """What `mlflow server` is started with."""

    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int | None = None
    allowed_hosts: str | None = None

    @classmethod
    def make(cls, backend_store_uri: str | None = None, artifacts_destination: str | None = None,
             host: str = "127.0.0.1", port: int = 5000, workers: int | None = None,
             allowed_hosts: str | None = None) -> Config:
        """Defaults under ./mlruns/server, apart from the local store so no experiment there points at a local path."""
        return cls(_with_driver(backend_store_uri or f"{tracking.SQLITE}{(DEFAULT_DIR / 'mlflow.db').resolve()}"),
                   artifacts_destination or str((DEFAULT_DIR / "artifacts").resolve()), host, port, workers,
                   allowed_hosts or _allowed_hosts(host))

    @property
    def uri(self) -> str:
        """The --tracking-uri clients pass: this machine's name when bound to every interface."""
        return f"http://{bracketed(socket.gethostname() if self.host in ANY else self.host)}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://{bracketed('127.0.0.1' if self.host in ANY else self.host)}:{self.port}/health"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
               "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
               "--host", self.host, "--port", str(self.port)]
        cmd += ["--workers", str(self.workers)] if self.workers else []
        return cmd + (["--allowed-hosts", self.allowed_hosts] if self.allowed_hosts else [])


def _with_driver(uri: str) -> str:
    """postgresql:// through psycopg2, the driver the postgres extra installs (SQLAlchemy 2.1 would pick psycopg 3)."""
    scheme, _, rest = uri.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgresql", "postgres") else uri


def bracketed(host: str) -> str:
    """A host as it stands in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def _allowed_hosts(host: str) -> str | None:
    """Beyond loopback, MLflow's default Host headers (localhost, private IPs) plus the name `uri` prints."""
    if host in LOOPBACK:
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    name = socket.gethostname() if host in ANY else host
    return ",".join([*get_default_allowed_hosts(), name, f"{name}:*"])


def check(config: Config) -> None:
    """Refuse at once what would make `mlflow server` die with a traceback: a taken port, a missing driver."""
    scheme, _, driver = config.backend_store_uri.split(":", 1)[0].partition("+")
    if scheme == "postgresql" and importlib.util.find_spec(driver) is None:
        raise ServerError(f"a PostgreSQL store needs its driver {driver}: pip install 'covidsearch[postgres]'")
    if config.artifacts_destination.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise ServerError("s3:// artifacts need boto3: pip install 'covidsearch[s3]'")
    error = listen_error(config.host, config.port)
    if error:
        raise ServerError(f"cannot listen on {config.host}:{config.port}: {error}; pick another --port or --host")
    db = tracking.sqlite_path(config.backend_store_uri)
    if db:
        db.parent.mkdir(parents=True, exist_ok=True)


def listen_error(host: str, port: int) -> str | None:
    """Why a server could not listen at host:port (taken, not an address of this machine), or None. SO_REUSEADDR as
    the servers themselves use it, so a restarted server's old connections do not count."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.strerror
    return None


def serve(config: Config, ready: Callable[[str], None], timeout: float = 300.0) -> int:
    """Run the server until it stops or is stopped (Ctrl-C, SIGTERM); call `ready` with its URI once it
    answers /health."""
    check(config)
    return run_child(config.command(), url=config.health_url, ready=lambda: ready(config.uri), timeout=timeout,
                     name="the MLflow server")


def run_child(command: list[str], env: dict[str, str] | None = None, url: str | None = None,
              ready: Callable[[], None] | None = None, timeout: float = 300.0, name: str = "the server") -> int:
    """Run a server program until it exits or this process is stopped (Ctrl-C, or SIGTERM as `docker stop` sends
    it); with `url`, call `ready` once it answers there. It runs in a process group of its own, and the whole group
    (MLflow's servers start workers) ends with it."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        if url:
            _wait_until_answers(process, url, timeout, name)
        if ready:
            ready()
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        end_group(process)


def end_group(process: subprocess.Popen) -> None:
    """Terminate a process and every process it started; kill them if they do not end within 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_until_answers(process: subprocess.Popen, url: str, timeout: float, name: str) -> None:
    """Until `url` answers OK; the server's own output (above) says why when it exits first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening (or not loaded) yet
        if time.monotonic() > deadline:
            raise ServerError(f"{name} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)
    raise ServerError(f"{name} exited (code {process.returncode}) before answering {url}: see its output above")
