"""The search space: sweep-YAML parameter specs -> Optuna distributions and back to training configs.

A space entry is keyed by a ``TrainConfig`` field (``gradient_weight``), the weight of a plug-in task's own
loss term (``edge_weight``, see :mod:`trainables.terms`) or a dotted path into the
free-form ``data``/``model`` sections (``model.hidden_channels``). Its value is either a
distribution spec (a mapping with ``type``) or a fixed value:

    gradient_weight: {type: loguniform, low: 1.0e-3, high: 1.0}
    perceptual_weight: {type: uniform, low: 0.0, high: 0.1}          # optional step
    warmup_steps: {type: int, low: 0, high: 200}                        # inclusive; optional step, log
    model.hidden_channels: {type: choice, values: [[8, 16], [16, 32]]}
    pixel_loss: mse                                                     # fixed
    model.depth: {type: fixed, value: {type: x}}                        # explicit fixed form

Optuna only stores primitive categorical values (None, bool, int, float, str). A choice with any
non-primitive value (a list, a dict) is encoded as index-labelled strings (``"0:[8, 16]"``) and
decoded by label lookup when the trial config is built, so any YAML value round-trips exactly.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union

import optuna
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from losstune.trainables.config import ConfigError, TrainConfig
from losstune.trainables.terms import loss_terms

# fields that cannot be searched: ``task`` changes the problem, ``epochs`` is the ASHA budget,
# ``composite_weights`` defines the objective (scores of different weights are not comparable)
UNSEARCHABLE = {"task": "the task is fixed per sweep (train.task)",
                "epochs": "epochs is the per-trial budget (train.epochs, ASHA's max_t)",
                "composite_weights": "the objective weights are set in objective.weights"}
DICT_SECTIONS = ("data", "model")
PRIMITIVES = (type(None), bool, int, float, str)


class SpaceError(ValueError):
    """A space entry is wrong; ``path`` is the dotted field path (e.g. ``space.lr.low``)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def distribution(self) -> optuna.distributions.BaseDistribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, value: Any) -> Any:
        return value

    def contains(self, value: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class _FloatRange(_Param):
    """What ``uniform`` and ``loguniform`` share: a closed float range [low, high]."""
    log: ClassVar[bool] = False  # sampled on a log scale (as IntParam.log)
    low: float
    high: float

    def decode(self, value: Any) -> float:
        return float(value)

    def extremes(self) -> list[float]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and self.low <= value <= self.high)


class UniformParam(_FloatRange):
    type: Literal["uniform"]
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "UniformParam":
        if not self.low < self.high:
            raise ValueError(f"high: empty range: low ({self.low}) must be < high ({self.high})")
        return self

    def distribution(self):
        return optuna.distributions.FloatDistribution(self.low, self.high, step=self.step)

    def midpoint(self) -> float:
        mid = (self.low + self.high) / 2
        if self.step:
            mid = self.low + round((mid - self.low) / self.step) * self.step
        return min(mid, self.high)

    def describe(self) -> str:
        return f"uniform[{self.low:g}, {self.high:g}]" + (f" step {self.step:g}" if self.step else "")


class LogUniformParam(_FloatRange):
    log: ClassVar[bool] = True
    type: Literal["loguniform"]

    @model_validator(mode="after")
    def _check(self) -> "LogUniformParam":
        if self.low <= 0:
            raise ValueError(f"low: loguniform needs low > 0 (got {self.low}); use uniform for ranges that include 0")
        if not self.low < self.high:
            raise ValueError(f"high: empty range: low ({self.low}) must be < high ({self.high})")
        return self

    def distribution(self):
        return optuna.distributions.FloatDistribution(self.low, self.high, log=True)

    def midpoint(self) -> float:
        return math.sqrt(self.low * self.high)

    def describe(self) -> str:
        return f"loguniform[{self.low:g}, {self.high:g}]"


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        if not self.low < self.high:
            raise ValueError(f"high: empty range: low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"low: a log int range needs low > 0 (got {self.low})")
        if self.log and self.step != 1:
            raise ValueError("step: a log int range needs step 1")
        return self

    def distribution(self):
        return optuna.distributions.IntDistribution(self.low, self.high, step=self.step, log=self.log)

    def decode(self, value: Any) -> int:
        return int(value)

    def midpoint(self) -> int:
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return int(self.low + round((mid - self.low) / self.step) * self.step)

    def extremes(self) -> list[int]:
        return [self.low, self.low + (self.high - self.low) // self.step * self.step]

    def describe(self) -> str:
        return f"int[{self.low}, {self.high}]" + (f" step {self.step}" if self.step != 1 else "") + \
            (" log" if self.log else "")

    def contains(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)


class ChoiceParam(_Param):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ChoiceParam":
        keys = [_canonical(v) for v in self.values]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"values: duplicate choice value(s): {', '.join(dupes)}")
        return self

    @property
    def encoded(self) -> bool:
        """True when the values are stored in Optuna as index-labelled strings."""
        return not all(isinstance(v, PRIMITIVES) for v in self.values)

    def labels(self) -> list[Any]:
        if not self.encoded:
            return list(self.values)
        return [f"{i}:{_canonical(v)}" for i, v in enumerate(self.values)]

    def distribution(self):
        return optuna.distributions.CategoricalDistribution(self.labels())

    def _index(self, value: Any) -> int | None:
        key = _canonical(value)
        for i, v in enumerate(self.values):
            if _canonical(v) == key and type(v) is type(value):
                return i
        for i, v in enumerate(self.values):  # 1 == 1.0, [8, 16] given as a tuple ...
            if _canonical(v) == key:
                return i
        return None

    def encode(self, value: Any) -> Any:
        i = self._index(value)
        if i is None:
            raise ValueError(f"{value!r} is not one of the choices {self.values!r}")
        return self.labels()[i]

    def decode(self, value: Any) -> Any:
        labels = self.labels()
        for label, real in zip(labels, self.values):
            if label == value and type(label) is type(value):
                return copy.deepcopy(real)
        for label, real in zip(labels, self.values):
            if label == value:
                return copy.deepcopy(real)
        raise ValueError(f"{value!r} is not one of the encoded choices {labels!r}")

    def contains(self, value: Any) -> bool:
        return self._index(value) is not None

    def midpoint(self) -> Any:
        return copy.deepcopy(self.values[0])

    def extremes(self) -> list[Any]:
        return [copy.deepcopy(v) for v in self.values]

    def describe(self) -> str:
        return "choice" + json.dumps(self.values, default=str)


class FixedParam(_Param):
    type: Literal["fixed"]
    value: Any


ParamSpec = Union[UniformParam, LogUniformParam, IntParam, ChoiceParam]
_ADAPTER = TypeAdapter(Annotated[Union[UniformParam, LogUniformParam, IntParam, ChoiceParam, FixedParam],
                                 Field(discriminator="type")])
PARAM_TYPES = ("uniform", "loguniform", "int", "choice", "fixed")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def config_keys(task: str | None) -> set[str]:
    """The top-level keys of a training config of ``task``: the fields and its terms' weights."""
    keys = set(TrainConfig.model_fields)
    if task is not None:
        try:
            keys.update(term.weight_key for term in loss_terms(task))
        except ConfigError:  # an unknown task is reported as train.task
            pass
    return keys


def check_key(key: str, task: str | None = None) -> None:
    """A space key must be a searchable training config key of ``task`` or a dotted path into data/model."""
    path = f"space.{key}"
    if not isinstance(key, str) or not key:
        raise SpaceError(path, "a space key must be a non-empty string")
    parts = key.split(".")
    head = parts[0]
    if head not in TrainConfig.model_fields and head not in (known := config_keys(task)):
        raise SpaceError(path, f"{head!r} is not a training config field; known fields: "
                               f"{', '.join(sorted(known))} "
                               f"(or a dotted path into {'/'.join(DICT_SECTIONS)}, e.g. model.hidden_channels)")
    if head in UNSEARCHABLE:
        raise SpaceError(path, f"cannot be searched: {UNSEARCHABLE[head]}")
    if len(parts) > 1 and head not in DICT_SECTIONS:
        raise SpaceError(path, f"dotted paths only go into {' or '.join(DICT_SECTIONS)}, not {head!r}")
    if head in DICT_SECTIONS and len(parts) == 1:
        raise SpaceError(path, f"search a key inside {head} (e.g. {head}.<name>), not the whole section")
    if any(not p for p in parts) or "/" in key:
        raise SpaceError(path, "malformed dotted path")


def parse_entry(key: str, raw: Any, task: str | None = None) -> ParamSpec | FixedParam:
    """One space entry -> a param spec, or :class:`FixedParam` for a fixed value."""
    check_key(key, task)
    if not (isinstance(raw, Mapping) and "type" in raw):
        return FixedParam(type="fixed", value=copy.deepcopy(raw))
    if raw.get("type") not in PARAM_TYPES:
        raise SpaceError(f"space.{key}.type", f"unknown parameter type {raw.get('type')!r}; "
                                               f"use one of {', '.join(PARAM_TYPES)}")
    try:
        return _ADAPTER.validate_python(dict(raw))
    except ValidationError as err:
        e = err.errors()[0]
        loc = [str(p) for p in e["loc"][1:]]  # drop the discriminator tag
        msg = e["msg"].removeprefix("Value error, ")
        field, sep, rest = msg.partition(": ")
        if not loc and sep and field in ("low", "high", "step", "values"):  # a model check naming its field
            loc, msg = [field], rest
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        raise SpaceError(".".join([f"space.{key}", *loc]), msg) from None


def parse_space(raw: Mapping[str, Any], task: str | None = None) -> tuple[dict[str, ParamSpec], dict[str, Any]]:
    """The space section -> (searched params, fixed values), both keyed by (dotted) field.

    ``task`` adds the weights of its own loss terms (:mod:`trainables.terms`) to the valid keys.

    >>> params, fixed = parse_space({"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3},
    ...                              "model.hidden_channels": {"type": "choice", "values": [[4, 8], [8, 8]]},
    ...                              "pixel_loss": "mse"})
    >>> describe(params), fixed
    ({'gradient_weight': 'uniform[0, 0.3]', 'model.hidden_channels': 'choice[[4, 8], [8, 8]]'}, {'pixel_loss': 'mse'})
    >>> parse_space({"gradient_wieght": {"type": "uniform", "low": 0.0, "high": 0.3}})
    Traceback (most recent call last):
    ...
    losstune.search.space.SpaceError: space.gradient_wieght: 'gradient_wieght' is not a training config field; ...
    """
    params: dict[str, ParamSpec] = {}
    fixed: dict[str, Any] = {}
    for key, value in raw.items():
        entry = parse_entry(key, value, task)
        if isinstance(entry, FixedParam):
            fixed[key] = entry.value
        else:
            params[key] = entry
    keys = sorted(raw)
    for a in keys:  # model and model.x, or model.a and model.a.b, would overwrite each other
        for b in keys:
            if b.startswith(a + "."):
                raise SpaceError(f"space.{b}", f"overlaps with space.{a}")
    return params, fixed


def distributions(params: Mapping[str, ParamSpec]) -> dict[str, optuna.distributions.BaseDistribution]:
    return {key: spec.distribution() for key, spec in params.items()}


def describe(params: Mapping[str, ParamSpec]) -> dict[str, str]:
    return {key: spec.describe() for key, spec in params.items()}


def get_path(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_path(config: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ValueError(f"{key}: {part!r} is not a mapping")
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each (dotted) key set to its value.

    >>> base = {"lr": 0.001, "model": {"depth": 2}}
    >>> apply_values(base, {"lr": 0.01, "model.base_channels": 8}), base["model"]
    ({'lr': 0.01, 'model': {'depth': 2, 'base_channels': 8}}, {'depth': 2})
    >>> get_path({"model": {"depth": 2}}, "model.depth"), get_path({}, "model.depth", "unset")
    (2, 'unset')
    """
    out = copy.deepcopy(dict(base))
    for key, value in values.items():
        set_path(out, key, copy.deepcopy(value))
    return out


def decode(params: Mapping[str, ParamSpec], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's (possibly encoded) sampled values -> the real values, keyed by (dotted) field."""
    # space keys never contain "/", so Ray's OptunaSearch hands back a flat dict
    return {key: spec.decode(sampled[key]) for key, spec in params.items() if key in sampled}


def trial_config(base: Mapping[str, Any], params: Mapping[str, ParamSpec], sampled: Mapping[str, Any]) -> dict:
    """The full training config (a raw mapping) of one trial.

    A choice of non-scalar values reaches Optuna as index-labelled strings and comes back decoded:

    >>> params, _ = parse_space({"model.hidden_channels": {"type": "choice", "values": [[4, 8], [8, 8]]}})
    >>> encode_point(params, {"model.hidden_channels": [8, 8]})
    {'model.hidden_channels': '1:[8, 8]'}
    >>> trial_config({"lr": 0.001}, params, {"model.hidden_channels": "1:[8, 8]"})
    {'lr': 0.001, 'model': {'hidden_channels': [8, 8]}}
    """
    return apply_values(base, decode(params, sampled))


def default_value(spec: ParamSpec, base: Mapping[str, Any], key: str) -> Any:
    """A sensible value for a param a point does not name: the base config's, when inside the space."""
    current = get_path(base, key, None)
    if current is None and key in TrainConfig.model_fields:
        current = TrainConfig.model_fields[key].default
    if current is not None and spec.contains(current):
        return copy.deepcopy(current)
    return spec.midpoint()


def complete_point(params: Mapping[str, ParamSpec], base: Mapping[str, Any], point: Mapping[str, Any],
                   path: str) -> dict[str, Any]:
    """A points_to_evaluate entry (real values, maybe partial) -> all params, real values.

    Raises :class:`SpaceError` naming ``<path>.<key>`` for unknown keys or values outside the space.
    A param the point does not name takes the base config's value when inside the space, else the midpoint.

    >>> params, _ = parse_space({"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3},
    ...                          "lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}})
    >>> complete_point(params, {"lr": 0.003}, {"gradient_weight": 0.1}, "search.points_to_evaluate[0]")
    {'gradient_weight': 0.1, 'lr': 0.003}
    >>> complete_point(params, {}, {"gradient_weight": 0.5}, "search.points_to_evaluate[0]")
    Traceback (most recent call last):
    ...
    losstune.search.space.SpaceError: search.points_to_evaluate[0].gradient_weight: 0.5 is outside the space uniform[0, 0.3]
    """
    if not isinstance(point, Mapping):
        raise SpaceError(path, f"expected a mapping of parameter values, got {type(point).__name__}")
    unknown = [k for k in point if k not in params]
    if unknown:
        raise SpaceError(f"{path}.{unknown[0]}", f"not a searched parameter; searched: {', '.join(params) or 'none'}")
    out = {}
    for key, spec in params.items():
        if key in point:
            value = point[key]
            if not spec.contains(value):
                raise SpaceError(f"{path}.{key}", f"{value!r} is outside the space {spec.describe()}")
            out[key] = copy.deepcopy(value)
        else:
            out[key] = default_value(spec, base, key)
    return out


def encode_point(params: Mapping[str, ParamSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    """Real values -> what Optuna stores (choice labels where encoded)."""
    return {key: params[key].encode(value) for key, value in values.items()}


def midpoint_values(params: Mapping[str, ParamSpec]) -> dict[str, Any]:
    return {key: spec.midpoint() for key, spec in params.items()}
