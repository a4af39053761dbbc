"""`covidsearch serve`: MLflow's scoring server on a trial's or a registered model (serving.Classifier).

The model reference is resolved as `predict` resolves it (inference.locate); what cannot be served as
image files is refused before the server starts.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow

from . import server, tracking
from .registry import RegistryError


@dataclass(frozen=True)
class Server:
    """MLflow's scoring server on one logged or registered model, and where it answers."""

    model_uri: str  # models:/...
    label: str
    host: str
    port: int
    tracking_uri: str

    @property
    def url(self) -> str:
        return f"http://{server.bracketed('127.0.0.1' if self.host in server.ANY else self.host)}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local",
                "-h", self.host, "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        """The store the model URI resolves in; MLflow starts `uvicorn` by name, so this interpreter's bin first."""
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "PATH": path}

    def ready_line(self) -> str:
        """One line: what is served where, and a request that works."""
        return (f"serving {self.label} at {self.url}/invocations (Ctrl-C stops it); try: "
                f"printf '{{\"inputs\": [\"%s\"]}}' \"$(base64 -w0 scan.png)\" | "
                f"curl -s {self.url}/invocations -H 'Content-Type: application/json' -d @-")


def prepare(ref: str, host: str = "127.0.0.1", port: int = 5001, tracking_uri: str | None = None) -> Server:
    """The scoring server for a model reference as `predict` takes it, refusing what it cannot serve as images."""
    from . import inference  # not imported where the model is served

    source = inference.locate(ref, tracking_uri)
    if not source.uri.startswith("models:/"):
        raise RegistryError(f"{source.label} is not in MLflow: serve a trial run id or a models:/ URI")
    if "keras" in mlflow.models.get_model_info(source.uri).flavors:
        raise RegistryError(f"{source.label} was logged before covidsearch served image files (it takes uint8 "
                            "arrays of its input size): serve a trial of a newer search")
    error = server.listen_error(host, port)
    if error:
        raise RegistryError(f"cannot listen on {host}:{port}: {error}; pick another --port or --host")
    return Server(source.uri, source.label, host, port, tracking.store_uri(tracking_uri))


def serve(found: Server) -> int:
    """Run the scoring server until it stops or is stopped; say where it answers once the model is loaded."""
    return server.run_child(found.command(), found.env(), f"{found.url}/ping",
                            lambda: print(found.ready_line(), flush=True), name="the scoring server")
