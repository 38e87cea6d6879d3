"""The sweep config's shape: its pydantic sections (``SweepFile``), the validated and resolved
:class:`Sweep`, and the rules of the MLflow tracking URI. Reading and validating a YAML file into a
``Sweep`` is :mod:`search.config`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from losstune.search import space as sp
from losstune.trainables.config import DEFAULT_COMPOSITE_WEIGHTS, ConfigError

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
    # a database store's (sqlite) MLflow work in a helper process instead of the driver: true / false / auto
    # (auto: true on a machine with at least STORE_PROCESS_MIN_CPUS cores; see search.tracking.store_process)
    store_process: bool | Literal["auto"] = "auto"

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
