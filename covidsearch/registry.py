"""Promote a trial's model to the MLflow model registry: the champion, and how to undo it.

Promotion uses MLflow 3 LoggedModels and aliases (stages are deprecated): the trial's logged
model becomes a version of a registered model (once per run), the alias (default
`covid-cxr@champion`) moves to it, and the version is tagged with what it was chosen on.

Undo: the version that held the alias keeps its tags plus `<alias>.demoted_at` and
`<alias>.replaced_by`; the new holder gets `<alias>.previous_version`. `promote --version N`
moves the alias back to version N (the promote command prints that line for every move).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import DEFAULT_ALIAS, DEFAULT_NAME, UserError, tracking

GATE = re.compile(r"\s*([\w.\-/]+)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


class RegistryError(UserError, ValueError):
    """A promotion, evaluation or prediction that cannot be done; shown as a one-line error."""


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """A client on the store without creating anything: a missing local store is an error, not a new one."""
    uri = tracking.store_uri(tracking_uri)
    db = tracking.sqlite_path(uri)
    if db and not db.is_file():
        raise RegistryError(f"no MLflow store at {uri}: run a search first, or pass --tracking-uri")
    return tracking.client(uri)


# ---------------------------------------------------------------- trials and gates


@dataclass(frozen=True)
class Trial:
    """A finished trial (or ensemble) run with what a registered version records about it."""

    run: Any  # mlflow.entities.Run
    model_id: str
    search: Any | None  # the parent search run

    @property
    def test_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.run.data.metrics.items() if k.startswith("test_")}

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Trials carry no class list: their search run's `classes` param does."""
        classes = self.search.data.params.get("classes") if self.search else None
        return tuple(classes.split("|")) if classes else None

    def version_tags(self) -> dict[str, str]:
        """Why this version was chosen, readable without the tracking runs: metrics, settings, data, classes, and the
        operating point its model carries."""
        record = self.run.data
        tags = {"trial_run_id": self.run.info.run_id, "model_id": self.model_id,
                tracking.KIND: record.tags[tracking.KIND], **{k: repr(v) for k, v in self.test_metrics.items()},
                **{f"hp.{k}": v for k, v in record.params.items()},
                **{k: record.tags[k] for k in (tracking.MEMBERS, tracking.TARGET_SENSITIVITY,
                                               tracking.THRESHOLD_REACHED) if k in record.tags}}
        if tracking.COVID_THRESHOLD in record.metrics:
            tags[tracking.COVID_THRESHOLD] = repr(record.metrics[tracking.COVID_THRESHOLD])
        if self.search:
            found = self.search.data
            tags["search_run_id"] = self.search.info.run_id
            tags.update({k: v for k, v in ((tracking.DATA_FINGERPRINT, found.tags.get(tracking.DATA_FINGERPRINT)),
                                           ("classes", "|".join(self.classes or ()))) if v})
        return tags


def _run(client: MlflowClient, run_id: str) -> Any:
    """The run, or a one-line error naming the id and the store."""
    try:
        return tracking.get_run(client, run_id)
    except tracking.StoreError as err:
        raise RegistryError(str(err)) from None


def _parent(client: MlflowClient, run: Any) -> Any | None:
    """The search run a trial is nested under: it holds the class list and the data fingerprint."""
    parent_id = run.data.tags.get(tracking.PARENT)
    return _run(client, parent_id) if parent_id else None


def finished_trial(client: MlflowClient, run_id: str) -> Trial:
    """The trial (or ensemble) behind run_id, refusing anything that is not a FINISHED one with a model and test
    metrics."""
    run = _run(client, run_id)
    kind = run.data.tags.get(tracking.KIND)
    if kind not in (tracking.TRIAL, tracking.ENSEMBLE):
        raise RegistryError(f"run {run_id} is {'a ' + kind if kind else 'not a covidsearch'} run, not a trial: "
                            "pick one of the trials listed by `covidsearch runs`")
    if run.info.status != "FINISHED":
        error = run.data.tags.get(tracking.ERROR, "").splitlines()
        raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED: only a finished trial's model can be used"
                            + (f" (its error: {error[0][:200]})" if error else ""))
    model_id = trial_model_id(client, run)
    if model_id is None:
        raise RegistryError(f"run {run_id} has no logged model named {tracking.MODEL!r}")
    trial = Trial(run, model_id, _parent(client, run))
    if not trial.test_metrics:
        raise RegistryError(f"run {run_id} has no test metrics (test_accuracy, ...): it cannot be judged")
    return trial


def trial_model_id(client: MlflowClient, run: Any) -> str | None:
    """A finished trial's MLflow model id: the one its search logged, or one made now with its figures from its logged
    data where the search left them for later (it did not beat the best); None for a run with neither."""
    model_id = tracking.logged_model(client, run)
    if model_id is None:
        from .recorder import complete_later  # Keras, only for a trial whose search left its model for later

        model_id = complete_later(client, run)
    return model_id


def check_gates(values: dict[str, float], require: Sequence[str], what: str) -> None:
    """Refuse a model that misses any METRIC>=VALUE or METRIC<=VALUE bound, naming every miss."""
    misses = []
    for text in require:
        match = GATE.fullmatch(text)
        if match is None:
            raise RegistryError(f"--require {text!r}: write METRIC>=VALUE or METRIC<=VALUE, "
                                "e.g. test_sensitivity_covid_19>=0.95")
        name, op, bound = match[1], match[2], float(match[3])
        if name not in values:
            raise RegistryError(f"{what} has no metric {name!r} for --require; it has: {', '.join(sorted(values))}")
        value = values[name]
        if not (value >= bound if op == ">=" else value <= bound):
            misses.append(f"{name} = {value:.4f}, required {op} {bound:g}")
    if misses:
        raise RegistryError(f"{what} refused: " + "; ".join(misses))


# ---------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Promotion:
    """What a promote did: the version now holding the alias and the one that held it before."""

    name: str
    alias: str
    version: str
    run_id: str | None
    created: bool  # a new version was registered
    previous: str | None  # the version that held the alias before this promotion (None: no version did)

    @property
    def moved(self) -> bool:
        return self.previous != self.version

    @property
    def undo(self) -> str | None:
        """The command that moves the alias back, when it moved from another version."""
        if self.previous is None or not self.moved:
            return None
        return f"covidsearch promote --version {self.previous} --name {self.name} --alias {self.alias}"

    def summary(self) -> str:
        """What changed in the registry and how to undo it, as the promote command prints it."""
        lines = [f"registered run {self.run_id} as {self.name} version {self.version}"] if self.created else []
        if not self.moved:
            lines.append(f"{self.name}@{self.alias} already points to version {self.version}: nothing changed")
        else:
            was = f" (was version {self.previous})" if self.previous else ""
            lines.append(f"{self.name}@{self.alias} -> version {self.version}{was}")
        if self.undo:
            lines.append(f"undo: {self.undo}")
        return "\n".join(lines)


def promote(client: MlflowClient, run_id: str, name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS,
            require: Sequence[str] = ()) -> Promotion:
    """Give a finished trial's model the alias: every check runs before the registry is touched."""
    trial = finished_trial(client, run_id)
    check_gates(trial.test_metrics, require, f"run {run_id}")
    own = f"models:/{trial.model_id}"
    return register(client, trial, lambda: own, trial.version_tags(), lambda v: v.source == own, name, alias)


def register(client: MlflowClient, trial: Trial, model_uri: Callable[[], str], tags: dict[str, str],
             same: Callable[[Any], bool], name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS) -> Promotion:
    """Give the alias to the trial's version that `same` recognises, registering model_uri() (called only then) with
    `tags` when there is none: promoting the same model twice adds no version."""
    run_id = trial.run.info.run_id
    existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if same(v)]
    if existing:
        version, created = str(min(int(v.version) for v in existing)), False
    else:
        version, created = str(mlflow.register_model(model_uri(), name, tags=tags).version), True
    return Promotion(name, alias, version, run_id, created, _move_alias(client, name, alias, version))


def promote_version(client: MlflowClient, version: str, name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS,
                    require: Sequence[str] = ()) -> Promotion:
    """Move the alias to an existing version: the undo of a promotion (gates read the version's tags)."""
    found = model_version(client, name, str(version))
    scores = {k: float(v) for k, v in found.tags.items() if k.startswith("test_")}
    check_gates(scores, require, f"{name} version {version}")
    return Promotion(name, alias, str(found.version), found.run_id, False,
                     _move_alias(client, name, alias, str(found.version)))


def registered_model(client: MlflowClient, name: str) -> Any | None:
    """The registered model, or None when there is none of that name yet."""
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def existing_model(client: MlflowClient, name: str) -> Any:
    """The registered model, or a one-line error for a name nothing was promoted to."""
    registered = registered_model(client, name)
    if registered is None:
        raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}: "
                            "promote a trial first (covidsearch promote RUN_ID)")
    return registered


def model_version(client: MlflowClient, name: str, version: str) -> Any:
    """A registered version, or a one-line error saying which part is unknown."""
    existing_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


def _move_alias(client: MlflowClient, name: str, alias: str, version: str) -> str | None:
    """Point the alias at version, leaving on both versions the tags that undo the move; returns the old holder."""
    holder = registered_model(client, name).aliases.get(alias)
    previous = None if holder is None else str(holder)
    if previous == version:
        return previous
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if previous:
        client.set_model_version_tag(name, previous, f"{alias}.demoted_at", now)
        client.set_model_version_tag(name, previous, f"{alias}.replaced_by", version)
        client.set_model_version_tag(name, version, f"{alias}.previous_version", previous)
    stale = set(client.get_model_version(name, version).tags) & {f"{alias}.demoted_at", f"{alias}.replaced_by"}
    for key in stale:  # a version promoted back holds the alias again: it is no longer demoted
        client.delete_model_version_tag(name, version, key)
    client.set_model_version_tag(name, version, f"{alias}.promoted_at", now)
    client.set_registered_model_alias(name, alias, version)
    return previous
