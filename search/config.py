"""The sweep config (YAML): load, validate, resolve. See the comment block of configs/microstructure.yaml.

Every problem raises :class:`SweepConfigError` whose message names the file and the field
(dotted path), e.g. ``configs/x.yaml: space.lr.low: loguniform needs low > 0``. Validation
starts nothing: no Ray, no MLflow run, no results directory.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from losstune.search import space as sp
from losstune.trainables.config import DEFAULT_COMPOSITE_WEIGHTS, ConfigError, parse_train_config

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
DEFAULT_EXPERIMENT = "losstune"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the pareto objective's metrics and their directions
PARETO_METRICS = {"ssim": "max", "mse": "min", "gradient_match": "max"}
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class SweepConfigError(ConfigError):
    """A sweep config is invalid; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSection(_Section):
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int | None = 0
    multivariate: bool = True
    constant_liar: bool = True
    n_startup_trials: int | None = Field(None, ge=0, description="TPE random start-up trials; None: auto")
    population_size: int | None = Field(None, ge=2, description="NSGA-II population; None: auto")
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)


class AshaSection(_Section):
    type: Literal["asha"]
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class FifoSection(_Section):
    type: Literal["fifo"]


def _check_weights(v: dict[str, float] | None) -> dict[str, float] | None:
    if v is None:
        return v
    unknown = sorted(set(v) - set(DEFAULT_COMPOSITE_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(DEFAULT_COMPOSITE_WEIGHTS)}")
    if any(w < 0 or not math.isfinite(w) for w in v.values()):
        raise ValueError("weights must be finite and >= 0")
    if sum(v.values()) <= 0:
        raise ValueError("weights must not all be 0")
    return v


class CompositeObjective(_Section):
    type: Literal["composite"]
    weights: dict[str, float] | None = None
    region: Literal["auto", "active", "full"] = "auto"  # -> train.objective_region (auto: active if the task has one)

    _weights = field_validator("weights")(_check_weights)


class ParetoObjective(_Section):
    type: Literal["pareto"]
    metrics: dict[str, Literal["max", "min"]] = Field(default_factory=lambda: dict(PARETO_METRICS))
    weights: dict[str, float] | None = None  # the composite still ranks trials (ASHA, best.yaml)
    region: Literal["auto", "active", "full"] = "auto"

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: dict[str, str]) -> dict[str, str]:
        known = set(PARETO_METRICS) | {"composite", "psnr", "sharpness_ratio", "histogram_distance"}
        unknown = sorted(set(v) - known - {f"{k}_active" for k in known} - {"composite_full"})
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}")
        if len(v) < 2:
            raise ValueError("a pareto objective needs at least 2 metrics")
        return v

    _weights = field_validator("weights")(_check_weights)


class ResourcesSection(_Section):
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"a fractional GPU share must be in (0, 1], or use a whole number (got {v})")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ResourcesSection":
        if self.cpu == 0 and self.gpu == 0:
            raise ValueError("cpu: a trial needs some resources (cpu > 0 or gpu > 0)")
        return self


class MlflowSection(_Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI
    experiment: str | None = Field(None, min_length=1)  # None: $MLFLOW_EXPERIMENT_NAME, else DEFAULT_EXPERIMENT
    enabled: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        check_tracking_uri(v)
        return v


class RaySection(_Section):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local Ray only")
    num_gpus: int | None = Field(None, ge=0, description="local Ray only")
    storage_path: str | None = Field(None, description="Tune's storage (shared FS or s3://); default results_dir")


class VerifySection(_Section):
    """After the search: re-train the ``top_k`` best configs and their matched baselines (every shaping weight
    0) on ``seeds`` fresh seeds for ``epochs`` (default: the sweep's) and say whether the weights matter."""
    enabled: bool = True
    top_k: int = Field(2, ge=1)
    seeds: int = Field(3, ge=2, description="at least 2: one seed gives no confidence interval")
    epochs: int | None = Field(None, ge=1)


class SweepFile(_Section):
    name: str
    train: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchSection = Field(default_factory=SearchSection)
    scheduler: AshaSection | FifoSection = Field(default_factory=lambda: AshaSection(type="asha"),
                                                 discriminator="type")
    objective: CompositeObjective | ParetoObjective = Field(
        default_factory=lambda: CompositeObjective(type="composite"), discriminator="type")
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    ray: RaySection = Field(default_factory=RaySection)
    verify: VerifySection | None = None
    results_dir: str = "results"
    allow_outside: bool = Field(False, description="let results_dir leave the working directory")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-', '.' (no path separators)")
        return v


class Sweep:
    """A validated, resolved sweep config.

    Attributes:
        file: the validated :class:`SweepFile` (``raw`` is the mapping it came from, after overrides).
        source: the YAML path it was read from (or ``None``).
        base_train: the full training config (a plain dict, all TrainConfig fields) with the fixed
            space values applied; every trial is ``space.trial_config(base_train, params, sampled)``.
        params: the searched parameters (dotted key -> spec), in file order.
        points: ``points_to_evaluate`` completed to every param (real values).
        warnings: one line each, printed when the sweep starts (e.g. a validation set too small to
            separate configs); found by the deep check.
    """

    def __init__(self, file: SweepFile, raw: dict[str, Any], source: str | None, base_train: dict[str, Any],
                 params: dict[str, sp.ParamSpec], fixed: dict[str, Any], points: list[dict[str, Any]],
                 overrides: Mapping[str, Any] | None = None):
        self.file, self.raw, self.source = file, raw, source
        self.base_train, self.params, self.fixed, self.points = base_train, params, fixed, points
        self.warnings: list[str] = []  # printed when the sweep starts (e.g. a small validation set)
        self.overrides = dict(overrides or {})  # dotted key -> value given as KEY=VALUE (provenance)

    def renamed(self, name: str) -> "Sweep":
        """The same sweep under another name (its own results folder and MLflow parent run)."""
        if not NAME_RE.match(name):
            raise SweepConfigError(f"name: {name!r}: use letters, digits, '_', '-', '.' (no path separators)")
        sweep = Sweep(self.file.model_copy(update={"name": name}), {**self.raw, "name": name}, self.source,
                      self.base_train, self.params, self.fixed, self.points, self.overrides)
        sweep.warnings = list(self.warnings)
        return sweep

    # convenient views
    @property
    def name(self) -> str:
        return self.file.name

    @property
    def search(self) -> SearchSection:
        return self.file.search

    @property
    def scheduler(self) -> AshaSection | FifoSection:
        return self.file.scheduler

    @property
    def objective(self) -> CompositeObjective | ParetoObjective:
        return self.file.objective

    @property
    def resources(self) -> ResourcesSection:
        return self.file.resources

    @property
    def epochs(self) -> int:
        return int(self.base_train["epochs"])

    @property
    def results_dir(self) -> Path:
        return Path(self.file.results_dir).expanduser().resolve()

    @property
    def sweep_dir(self) -> Path:
        return self.results_dir / self.name

    @property
    def tracking_uri(self) -> str:
        return resolve_tracking_uri(self.file.mlflow.tracking_uri)

    @property
    def experiment(self) -> str:
        return resolve_experiment(self.file.mlflow.experiment)

    @property
    def storage_path(self) -> str:
        """Where Tune keeps the experiment (its dir is ``<storage_path>/<name>``)."""
        sp_ = self.file.ray.storage_path
        if sp_ is None:
            return str(self.results_dir)
        return sp_ if "://" in sp_ else str(Path(sp_).expanduser().resolve())

    @property
    def verify(self) -> VerifySection | None:
        """The verification to run after the search (None: off)."""
        v = self.file.verify
        return v if v is not None and v.enabled else None

    @property
    def is_pareto(self) -> bool:
        return self.objective.type == "pareto"

    def metric_mode(self) -> tuple[str | list[str], str | list[str]]:
        """Optuna's metric(s) and mode(s)."""
        if isinstance(self.objective, ParetoObjective):
            return list(self.objective.metrics), list(self.objective.metrics.values())
        return "composite", "max"


# ----- tracking URI ---------------------------------------------------------------------------
def check_tracking_uri(uri: str) -> None:
    """Refuse credentials in the URI and stores that cannot work (the file store)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if parts.username or parts.password or (parts.netloc and "@" in parts.netloc):
        raise ValueError("credentials in the tracking URI are refused; set MLFLOW_TRACKING_USERNAME / "
                         "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the environment instead")
    if scheme in ("", "file") or (len(scheme) == 1 and uri[1:2] == ":"):  # a path, file://, C:\
        raise ValueError(f"{uri!r}: MLflow's file store is not supported; use sqlite:///path/to/mlflow.db "
                         "or an http(s):// tracking server")
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"{uri!r}: unsupported scheme {parts.scheme!r}; use one of {', '.join(TRACKING_SCHEMES)}")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ValueError(f"{uri!r}: a sqlite URI is sqlite:///relative/path.db or sqlite:////absolute/path.db")


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI: ``uri`` (``--tracking-uri``, else the config's ``mlflow.tracking_uri``), else
    $MLFLOW_TRACKING_URI, else :data:`DEFAULT_TRACKING_URI`; sqlite paths made absolute (vs the CWD)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not path.startswith("/"):
            return "sqlite:///" + str(Path(path).expanduser().resolve())
    return uri


def resolve_experiment(name: str | None) -> str:
    """The MLflow experiment: ``name`` (``--experiment``, else the config's ``mlflow.experiment``), else
    $MLFLOW_EXPERIMENT_NAME, else :data:`DEFAULT_EXPERIMENT`."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


# ----- loading ----------------------------------------------------------------------------------
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
    """
    where = source or "<config>"

    def fail(msg: str) -> SweepConfigError:
        return SweepConfigError(f"{where}: {msg}")

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
        file = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise fail(_first_lines(_format_errors(err))) from None

    if check_paths and not file.allow_outside and (overrides or {}).get("results_dir") is None:
        cwd = Path.cwd().resolve()
        target = Path(file.results_dir).expanduser().resolve()
        if target != cwd and cwd not in target.parents:
            raise fail(f"results_dir: {file.results_dir!r} ({target}) is outside the working directory {cwd}; "
                       "pass --results-dir to write there, or set allow_outside: true")

    # the fixed training config, then the space
    try:
        base = parse_train_config(file.train, prefix="train.")
    except ConfigError as err:
        raise fail(str(err)) from None
    try:
        params, fixed = sp.parse_space(file.space, task=base.task)
    except sp.SpaceError as err:
        raise fail(str(err)) from None
    base_raw = base.model_dump()
    # objective weights define the composite score every trial reports
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
    base_raw = sp.apply_values(base_raw, fixed)
    try:
        base = parse_train_config(base_raw, prefix="train.")
    except ConfigError as err:
        raise fail(str(err)) from None
    base_raw = base.model_dump()

    # every searched value must make a valid training config
    for key, spec in params.items():
        for value in spec.extremes():
            candidate = sp.apply_values(base_raw, {key: value})
            try:
                parse_train_config(candidate)
            except ConfigError as err:
                raise fail(f"space.{key}: value {value!r} gives an invalid training config: "
                           f"{_strip_field(str(err), key)}") from None

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

    # cross-section checks
    if isinstance(file.scheduler, AshaSection) and file.scheduler.grace_period > base.epochs:
        raise fail(f"scheduler.grace_period: {file.scheduler.grace_period} is more than train.epochs "
                   f"({base.epochs})")
    if base.device.startswith("cuda") and file.resources.gpu == 0:
        raise fail(f"resources.gpu: train.device is {base.device!r} but the trials request no GPU "
                   "(set resources.gpu, e.g. 1 or 0.5)")

    # the task must exist (and, deep, accept its data/model sections)
    if not check_task:
        return Sweep(file, raw, source, base_raw, params, fixed, points, sets)
    from losstune.trainables.registry import get_task_factory
    try:
        factory = get_task_factory(base.task)
    except ConfigError as err:
        raise fail(f"train.{err}") from None
    if deep:
        midpoint = parse_train_config(sp.apply_values(base_raw, points[0] if points else sp.midpoint_values(params)))
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
        sweep = Sweep(file, raw, source, base_raw, params, fixed, points, sets)
        sweep.warnings += [w for w in (small_validation_warning(task),) if w]
        return sweep

    return Sweep(file, raw, source, base_raw, params, fixed, points, sets)


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
