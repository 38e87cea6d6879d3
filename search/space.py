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

The specs themselves (distributions, midpoints, the encoding of choices for Optuna) are
:mod:`search.param_specs`; this module checks the keys, parses the section, and puts sampled values
into a trial's training config.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import optuna
from pydantic import ValidationError

from losstune.search.param_specs import PARAM_TYPES, FixedParam, ParamSpec, parse_spec
# the spec classes under their former names here: Tune's stored state of a sweep started before they moved
# to param_specs refers to them as losstune.search.space.<class>, and --resume unpickles it
from losstune.search.param_specs import ChoiceParam, IntParam, LogUniformParam, UniformParam  # noqa: F401
from losstune.trainables.config import ConfigError, TrainConfig
from losstune.trainables.terms import loss_terms

# fields that cannot be searched: ``task`` changes the problem, ``epochs`` is the ASHA budget,
# ``composite_weights`` defines the objective (scores of different weights are not comparable)
UNSEARCHABLE = {"task": "the task is fixed per sweep (train.task)",
                "epochs": "epochs is the per-trial budget (train.epochs, ASHA's max_t)",
                "composite_weights": "the objective weights are set in objective.weights"}
DICT_SECTIONS = ("data", "model")


class SpaceError(ValueError):
    """A space entry is wrong; ``path`` is the dotted field path (e.g. ``space.lr.low``)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


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
        return parse_spec(raw)
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
