"""Search spaces as data: a TOML file declares hyperparameters, fixed settings and tuner defaults.

A space file has three tables:
  [search]           tuner defaults (tuner, max_trials, max_epochs, objective, ...)
  [fixed]            settings every trial shares (model family, colour mode, patience, weights, ...)
  [hyperparameters]  one entry per hyperparameter:
      name = { type = "choice", values = [...], default = ... }
      name = { type = "int", min = 32, max = 128, step = 2, default = 50 }
      name = { type = "float", min = 1e-5, max = 1e-2, sampling = "log", default = 1e-3 }
      name = { type = "boolean", default = false }
    any entry may add `when = { other = [values...] }`: it only matters for those values.
Each default is the tutorial's value, so the default point is the tutorial's configuration.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras_tuner as kt

from . import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The spaces covidsearch ships: covidsearch/experiments/ when installed from a wheel, experiments/ at the top of a
# source checkout (pyproject.toml maps one onto the other).
_PACKAGE = Path(__file__).resolve().parent
BUILT_IN = next((d for d in (_PACKAGE / "experiments", _PACKAGE.parent / "experiments") if d.is_dir()),
                _PACKAGE / "experiments")
TYPES = ("choice", "int", "float", "boolean")


class SpaceError(UserError, ValueError):
    """A space file or --set override the user must fix; shown as a one-line error."""


@dataclass
class Param:
    """One declared hyperparameter, as written in the space file."""

    name: str
    type: str
    default: Any
    values: list | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    sampling: str = "linear"
    when: dict[str, list] = field(default_factory=dict)

    def contains(self, value: Any) -> bool:
        """Whether a value lies inside this hyperparameter's range."""
        if self.type == "choice":
            return value in self.values
        if self.type == "boolean":
            return isinstance(value, bool)
        if not self.min <= value <= self.max:
            return False
        if self.type == "int" and self.step:
            return (value - self.min) % self.step == 0
        return True

    def parse(self, text: str) -> Any:
        """Read a --set value as this hyperparameter's type."""
        if self.type == "boolean":
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise SpaceError(f"--set {self.name}={text}: expected true or false")
        if self.type == "choice":
            for value in self.values:
                if str(value) == text or (not isinstance(value, str) and _number(text) == value):
                    return value
            raise SpaceError(f"--set {self.name}={text}: not one of {self.values}")
        value = _number(text)
        if value is None or (self.type == "int" and value != int(value)):
            raise SpaceError(f"--set {self.name}={text}: expected {'an integer' if self.type == 'int' else 'a number'}")
        return int(value) if self.type == "int" else float(value)

    def declare(self, hp: kt.HyperParameters, fixed: Any = None) -> None:
        """Declare on Keras Tuner's HyperParameters, pinned to `fixed` when given."""
        cond = {}
        if self.when:
            (parent, values), = self.when.items()
            cond = {"parent_name": parent, "parent_values": values}
        if fixed is not None:
            hp.Fixed(self.name, fixed, **cond)
        elif self.type == "choice":
            hp.Choice(self.name, self.values, default=self.default, **cond)
        elif self.type == "boolean":
            hp.Boolean(self.name, default=self.default, **cond)
        elif self.type == "int":
            hp.Int(self.name, int(self.min), int(self.max), step=int(self.step or 1), sampling=self.sampling,
                   default=self.default, **cond)
        else:
            hp.Float(self.name, self.min, self.max, step=self.step, sampling=self.sampling,
                     default=self.default, **cond)


@dataclass
class Space:
    """A loaded space: where it came from, its hyperparameters, fixed settings and tuner defaults."""

    path: Path
    params: dict[str, Param]
    fixed: dict[str, Any]
    search: dict[str, Any]
    pinned: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """The default point (the tutorial's configuration), active hyperparameters only."""
        return {name: value for name, value in self.hyperparameters().values.items()}

    def hyperparameters(self) -> kt.HyperParameters:
        """Keras Tuner HyperParameters with every declared one (pins applied), at default values."""
        hp = kt.HyperParameters()
        for param in self.params.values():
            param.declare(hp, self.pinned.get(param.name))
        return hp

    def config(self, values: dict[str, Any]) -> dict[str, Any]:
        """A trial's full configuration: fixed settings plus its hyperparameter values."""
        return {**self.fixed, **{k: _tidy(v) for k, v in values.items() if not k.startswith("tuner/")}}

    def pin(self, assignments: list[str]) -> "Space":
        """Apply `--set NAME=VALUE` overrides: hyperparameters are pinned, fixed settings replaced."""
        for item in assignments:
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise SpaceError(f"--set {item!r}: expected NAME=VALUE")
            if name in self.params:
                param = self.params[name]
                value = param.parse(text.strip())
                if not param.contains(value):
                    raise SpaceError(f"--set {name}={text}: outside the space ({_describe(param)})")
                self.pinned[name] = value
            elif name in self.fixed:
                self.fixed[name] = _like(self.fixed[name], text.strip(), name)
            else:
                known = sorted([*self.params, *self.fixed])
                raise SpaceError(f"--set {name}: unknown name; this space has {', '.join(known)}")
        return self


def _tidy(value: Any) -> Any:
    """Float steps accumulate error (0.30000000000000004); records and models get 0.3."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _number(text: str) -> float | int | None:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def _like(current: Any, text: str, name: str) -> Any:
    """Parse a --set value for a fixed setting as the type of its current value."""
    if isinstance(current, bool):
        return Param(name, "boolean", current).parse(text)
    if isinstance(current, (int, float)):
        value = _number(text)
        if value is None:
            raise SpaceError(f"--set {name}={text}: expected a number")
        return type(current)(value) if isinstance(current, float) or value == int(value) else value
    return text


def _describe(param: Param) -> str:
    if param.type == "choice":
        return f"one of {param.values}"
    if param.type == "boolean":
        return "true or false"
    return f"{param.min} to {param.max}" + (f" step {param.step}" if param.step else "")


def resolve(name_or_path: str) -> Path:
    """`--space NAME` means experiments/NAME.toml, the user's own (in the working directory) before the built-in
    ones; anything else is a path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SpaceError(f"space file not found: {path}")
        return path
    folders = (Path("experiments"), BUILT_IN)
    for folder in folders:
        if (folder / f"{name_or_path}.toml").is_file():
            return folder / f"{name_or_path}.toml"
    known = sorted({p.stem for folder in folders for p in folder.glob("*.toml")})
    raise SpaceError(f"unknown space {name_or_path!r}; spaces in experiments/ and built in: {', '.join(known)}")


def load(name_or_path: str) -> Space:
    """Read and validate a space file."""
    path = resolve(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{path}: not valid TOML: {err}") from None
    unknown_tables = set(doc) - {"search", "fixed", "hyperparameters"}
    if unknown_tables:
        raise SpaceError(f"{path}: unknown table(s) {sorted(unknown_tables)}")
    params = {name: _param(path, name, spec) for name, spec in doc.get("hyperparameters", {}).items()}
    for param in params.values():
        for parent, values in param.when.items():
            if parent not in params:
                raise SpaceError(f"{path}: {param.name} depends on unknown hyperparameter {parent!r}")
            if not all(params[parent].contains(v) for v in values):
                raise SpaceError(f"{path}: {param.name}.when lists values outside {parent}")
    space = Space(path, params, dict(doc.get("fixed", {})), dict(doc.get("search", {})))
    try:
        space.hyperparameters()
    except ValueError as err:
        raise SpaceError(f"{path}: {err}") from None
    return space


def _param(path: Path, name: str, spec: Any) -> Param:
    """Validate one hyperparameter entry."""
    where = f"{path}: hyperparameter {name!r}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a table like {{ type = \"choice\", values = [...] }}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{where}: unknown type {kind!r}; use one of {', '.join(TYPES)}")
    allowed = {"type", "default", "when", "values"} if kind == "choice" else (
        {"type", "default", "when"} if kind == "boolean" else {"type", "default", "when", "min", "max", "step",
                                                                "sampling"})
    extra = set(spec) - allowed
    if extra:
        raise SpaceError(f"{where}: unknown key(s) {sorted(extra)} for type {kind}")
    if "default" not in spec:
        raise SpaceError(f"{where}: needs a default (the tutorial's value)")
    when = spec.get("when", {})
    if not isinstance(when, dict) or len(when) > 1:
        raise SpaceError(f"{where}: `when` must name one hyperparameter, e.g. when = {{ backbone = [...] }}")
    if kind == "choice" and not isinstance(spec.get("values"), list):
        raise SpaceError(f"{where}: a choice needs values = [...]")
    if kind == "choice" and not spec["values"]:
        raise SpaceError(f"{where}: values is empty; a choice needs at least one value")
    if kind in ("int", "float") and ("min" not in spec or "max" not in spec):
        raise SpaceError(f"{where}: needs min and max")
    if spec.get("sampling", "linear") not in ("linear", "log", "reverse_log"):
        raise SpaceError(f"{where}: sampling must be linear, log or reverse_log")
    param = Param(name=name, type=kind, default=spec["default"], values=spec.get("values"), min=spec.get("min"),
                  max=spec.get("max"), step=spec.get("step"), sampling=spec.get("sampling", "linear"),
                  when={k: list(v) for k, v in when.items()})
    problem = _contradiction(param) if kind in ("int", "float") else None
    if problem:
        raise SpaceError(f"{where}: {problem}")
    if not param.contains(param.default):
        raise SpaceError(f"{where}: default {param.default!r} is outside the space ({_describe(param)})")
    return param


def _contradiction(param: Param) -> str | None:
    """What makes a numeric range impossible, so the error names it and not its symptom (a default outside it)."""
    numbers = {"min": param.min, "max": param.max, "default": param.default}
    if param.step is not None:
        numbers["step"] = param.step
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{key} must be finite, got {value}"
        if param.type == "int" and value != int(value):
            return f"{key} {value} must be a whole number for type int"
    if param.min > param.max:
        return f"min {param.min} is greater than max {param.max}"
    if param.step is not None and param.step <= 0:
        return f"step {param.step} must be greater than 0"
    if param.sampling != "linear" and param.min <= 0:
        return f"{param.sampling} sampling needs min greater than 0, got min {param.min}"
    return None
