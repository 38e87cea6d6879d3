"""The sweep config (YAML): load, validate, resolve. See the comment block of configs/microstructure.yaml.

Every problem raises :class:`SweepConfigError` whose message names the file and the field
(dotted path), e.g. ``configs/x.yaml: space.lr.low: loguniform needs low > 0``. Validation
starts nothing: no Ray, no MLflow run, no results directory. The sections and the resolved
:class:`Sweep` are defined in :mod:`search.config_schema`; this module re-exports them, so
``from losstune.search.config import Sweep, SweepConfigError, ...`` is the one entry point.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml
from pydantic import ValidationError

from losstune.search import space as sp
from losstune.search.config_schema import (DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, NAME_RE, PARETO_METRICS,
                                           TRACKING_SCHEMES, AshaSection, CompositeObjective, FifoSection,
                                           MlflowSection, ParetoObjective, RaySection, ResourcesSection,
                                           SearchSection, Sweep, SweepConfigError, SweepFile, VerifySection,
                                           check_tracking_uri, resolve_experiment, resolve_tracking_uri)
from losstune.trainables.config import ConfigError, parse_train_config

__all__ = [
    "DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "NAME_RE", "OVERRIDES", "PARETO_METRICS", "TRACKING_SCHEMES",
    "AshaSection", "CompositeObjective", "FifoSection", "MlflowSection", "ParetoObjective", "RaySection",
    "ResourcesSection", "SearchSection", "Sweep", "SweepConfigError", "SweepFile", "VerifySection",
    "check_tracking_uri", "load_sweep", "parse_overrides", "read_yaml", "resolve_experiment",
    "resolve_tracking_uri", "validate_sweep",
]


OVERRIDES = {  # CLI flag -> dotted config key
    "name": "name",
    "num_samples": "search.num_samples",
    "address": "ray.address",
    "results_dir": "results_dir",
    "tracking_uri": "mlflow.tracking_uri",
    "experiment": "mlflow.experiment",
}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "space.lr.high=0.1"]`` -> ``{"train.epochs": 3, "space.lr.high": 0.1}``.

    Keys are dotted paths into the sweep config; values are YAML (``3`` is an int, ``[4, 8]`` a list,
    ``{type: uniform, low: 0, high: 1}`` a mapping, an empty value null). Validation happens with the
    config's (:func:`validate_sweep`), so an unknown key is reported there with its dotted path.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        if not all(part.isidentifier() or part.replace("-", "_").isidentifier() for part in key.split(".")):
            raise SweepConfigError(f"override {item!r}: {key!r} is not a dotted config key")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise SweepConfigError(f"override {key}: the value {text!r} is not valid YAML: {problem}") from None
    return out


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SweepConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SweepConfigError(f"{path}: cannot read: {err}") from None


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None, deep: bool = True,
               check_task: bool = True, check_paths: bool = True, sets: Mapping[str, Any] | None = None) -> Sweep:
    """Read, override and validate a sweep YAML.

    ``sets``: dotted config key -> value (``losstune sweep CONFIG key=value``, see :func:`parse_overrides`),
    applied first; ``overrides``: CLI flag -> value (see :data:`OVERRIDES`), applied after, so a flag wins.
    """
    raw = read_yaml(path)
    if raw is None:
        raise SweepConfigError(f"{path}: the file is empty")
    return validate_sweep(raw, source=str(path), overrides=overrides, deep=deep, check_task=check_task,
                          check_paths=check_paths, sets=sets)


def validate_sweep(raw: Any, source: str | None = None, overrides: Mapping[str, Any] | None = None,
                   deep: bool = True, check_task: bool = True, check_paths: bool = True,
                   sets: Mapping[str, Any] | None = None) -> Sweep:
    """Validate a sweep mapping (``sets`` and ``overrides`` as in :func:`load_sweep`).

    ``check_task`` resolves the task factory (unknown task -> error); ``deep`` also builds the task
    once with a representative point, which checks its data/model sections (and data folders).
    ``check_paths``: a config's ``results_dir`` must stay inside the working directory unless
    ``--results-dir`` overrides it or the config sets ``allow_outside: true`` (off for losstune's own
    saved copy, ``<sweep>/sweep.yaml``, which holds absolute paths).

    The checks run in this order, and the first problem is the error: the sections (with ``sets`` and
    ``overrides`` applied), the results folder, the fixed training config, every searched value, the
    hand-set points, checks across sections, the task.
    """
    where = source or "<config>"

    def fail(msg: str) -> SweepConfigError:
        return SweepConfigError(f"{where}: {msg}")

    file, raw = _sections(raw, overrides, sets, fail)
    if check_paths and not file.allow_outside and (overrides or {}).get("results_dir") is None:
        _check_results_dir(file, fail)
    base, base_raw, params, fixed = _training_base(file, fail)
    _check_searched_values(params, base_raw, fail)
    points = _points(file, params, base_raw, fail)
    _check_across_sections(file, base, fail)
    sweep = Sweep(file, raw, source, base_raw, params, fixed, points, sets)
    if check_task:
        _check_task(sweep, base, deep, fail)
    return sweep


def _sections(raw: Any, overrides: Mapping[str, Any] | None, sets: Mapping[str, Any] | None,
              fail: Callable[[str], SweepConfigError]) -> tuple[SweepFile, dict[str, Any]]:
    """The file's sections, ``sets`` then ``overrides`` applied to a copy of ``raw`` (returned too)."""
    if not isinstance(raw, Mapping):
        raise fail(f"expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    for key, value in (sets or {}).items():
        try:
            sp.set_path(raw, key, copy.deepcopy(value))
        except ValueError:
            raise fail(f"{key}: cannot set it: {_parent_not_mapping(raw, key)} is not a mapping") from None
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        if flag not in OVERRIDES:
            raise ValueError(f"unknown override {flag!r}")
        try:
            sp.set_path(raw, OVERRIDES[flag], value)
        except ValueError:  # the section is not a mapping: validation names it below
            pass
    try:
        return SweepFile.model_validate(raw), raw
    except ValidationError as err:
        raise fail(_first_lines(_format_errors(err))) from None


def _check_results_dir(file: SweepFile, fail: Callable[[str], SweepConfigError]) -> None:
    cwd = Path.cwd().resolve()
    target = Path(file.results_dir).expanduser().resolve()
    if target != cwd and cwd not in target.parents:
        raise fail(f"results_dir: {file.results_dir!r} ({target}) is outside the working directory {cwd}; "
                   "pass --results-dir to write there, or set allow_outside: true")


def _training_base(file: SweepFile, fail: Callable[[str], SweepConfigError]):
    """The fixed training config every trial starts from: ``train`` with the objective's settings and the
    space's fixed values applied. Returns ``(TrainConfig, its dict, searched specs, fixed values)``."""
    try:
        base = parse_train_config(file.train, prefix="train.")
    except ConfigError as err:
        raise fail(str(err)) from None
    try:
        params, fixed = sp.parse_space(file.space, task=base.task)
    except sp.SpaceError as err:
        raise fail(str(err)) from None
    base_raw = base.model_dump()
    # the objective's weights and region decide the composite score every trial reports
    if file.objective.weights is not None:
        given = file.train.get("composite_weights")
        if given is not None and dict(given) != dict(file.objective.weights):
            raise fail("objective.weights: differs from train.composite_weights; set the weights in one place")
        base_raw["composite_weights"] = dict(file.objective.weights)
    if file.objective.region != "auto":
        given = file.train.get("objective_region")
        if given is not None and given != file.objective.region:
            raise fail("objective.region: differs from train.objective_region; set the region in one place")
        base_raw["objective_region"] = file.objective.region
    for key, value in fixed.items():
        try:
            parse_train_config(sp.apply_values(base_raw, {key: value}))
        except ConfigError as err:
            raise fail(f"space.{key}: {_strip_field(str(err), key)}") from None
    try:
        base = parse_train_config(sp.apply_values(base_raw, fixed), prefix="train.")
    except ConfigError as err:
        raise fail(str(err)) from None
    return base, base.model_dump(), params, fixed


def _check_searched_values(params: Mapping[str, sp.ParamSpec], base_raw: Mapping[str, Any],
                           fail: Callable[[str], SweepConfigError]) -> None:
    """Every searched value (each range's extremes) must make a valid training config."""
    for key, spec in params.items():
        for value in spec.extremes():
            try:
                parse_train_config(sp.apply_values(base_raw, {key: value}))
            except ConfigError as err:
                raise fail(f"space.{key}: value {value!r} gives an invalid training config: "
                           f"{_strip_field(str(err), key)}") from None


def _points(file: SweepFile, params: Mapping[str, sp.ParamSpec], base_raw: Mapping[str, Any],
            fail: Callable[[str], SweepConfigError]) -> list[dict[str, Any]]:
    """``search.points_to_evaluate``, each completed to every searched key and checked as a training config."""
    points = []
    for i, point in enumerate(file.search.points_to_evaluate):
        path = f"search.points_to_evaluate[{i}]"
        try:
            values = sp.complete_point(params, base_raw, point, path)
        except sp.SpaceError as err:
            raise fail(str(err)) from None
        try:
            parse_train_config(sp.apply_values(base_raw, values))
        except ConfigError as err:
            raise fail(f"{path}: gives an invalid training config: {err}") from None
        points.append(values)
    return points


def _check_across_sections(file: SweepFile, base, fail: Callable[[str], SweepConfigError]) -> None:
    if isinstance(file.scheduler, AshaSection) and file.scheduler.grace_period > base.epochs:
        raise fail(f"scheduler.grace_period: {file.scheduler.grace_period} is more than train.epochs "
                   f"({base.epochs})")
    if base.device.startswith("cuda") and file.resources.gpu == 0:
        raise fail(f"resources.gpu: train.device is {base.device!r} but the trials request no GPU "
                   "(set resources.gpu, e.g. 1 or 0.5)")


def _check_task(sweep: Sweep, base, deep: bool, fail: Callable[[str], SweepConfigError]) -> None:
    """The task must exist; ``deep``: it builds with a representative point (the first hand-set one, else the
    space's midpoint), which checks its data/model sections; a small validation set adds a warning."""
    from losstune.trainables.registry import get_task_factory
    try:
        factory = get_task_factory(base.task)
    except ConfigError as err:
        raise fail(f"train.{err}") from None
    if not deep:
        return
    point = sweep.points[0] if sweep.points else sp.midpoint_values(sweep.params)
    midpoint = parse_train_config(sp.apply_values(sweep.base_train, point))
    try:
        task = factory(midpoint)
    except ConfigError as err:
        raise fail(_prefix_train(str(err))) from None
    except (FileNotFoundError, NotADirectoryError) as err:
        raise fail(f"train.data: {err}") from None
    except Exception as err:  # noqa: BLE001 - a task that cannot be built is a config problem here
        raise fail(f"train: building task {base.task!r} failed: {type(err).__name__}: {err}") from None
    if midpoint.objective_region == "active" and task.eval_mask is None:
        raise fail(f"objective.region: 'active' but task {base.task!r} gives no evaluation region (use full or auto)")
    from losstune.trainables.loop import small_validation_warning
    sweep.warnings += [w for w in (small_validation_warning(task),) if w]


def _parent_not_mapping(raw: Mapping[str, Any], key: str) -> str:
    """The first dotted prefix of ``key`` whose value in ``raw`` is not a mapping."""
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            return ".".join(parts[:i + 1])
    return key


def _format_errors(err: ValidationError) -> str:
    """One line per problem, dotted path first; discriminator tags (``scheduler.asha.x``) dropped."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if len(loc) > 1 and loc[0] in ("scheduler", "objective") and loc[1] in ("asha", "fifo", "composite", "pareto"):
            del loc[1]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        lines.append(f"{'.'.join(loc) or 'config'}: {msg}")
    return "\n".join(lines)


def _first_lines(msg: str, n: int = 5) -> str:
    lines = msg.splitlines()
    return "\n".join(lines[:n] + ([f"... and {len(lines) - n} more"] if len(lines) > n else []))


def _strip_field(msg: str, key: str) -> str:
    head = key.split(".")[0]
    for prefix in (f"{key}: ", f"{head}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _prefix_train(msg: str) -> str:
    """``field: …`` -> ``train.field: …``; a message about a file (``/data/b.png: …``) -> ``train.data: …``."""
    def one(line: str) -> str:
        if line.startswith("train."):
            return line
        head = line.split(":", 1)[0]
        if head and all(part.isidentifier() or part.isdigit() for part in head.split(".")):
            return f"train.{line}"
        return f"train.data: {line}"
    return "\n".join(one(line) for line in msg.splitlines())
