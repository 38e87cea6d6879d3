"""``losstune sweep CONFIG --dry-run``: check everything a real run checks and print the plan.

Starts nothing and writes nothing: no Ray, no results folder, no MLflow store or run. The checks are
the real run's: the config (already validated deep by :func:`losstune.search.config.load_sweep`), the
name (a taken one becomes NAME-2 ... as in the run), the tracking store (through MLflow's client;
a sqlite store's folder is checked, not made), the Ray address (something answers there) and, for a
local Ray, that one trial fits on this machine.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from losstune.search import space as sp
from losstune.search.config import Sweep
from losstune.search.ray_session import RayTokenRefused, check_ray_token, probe_address, ray_address
from losstune.search.runner import SweepInputError, choose_name, sweep_to_resume
from losstune.search.sweep_setup import overrides_text
from losstune.search.tracking import TrackingUnavailable, check_tracking


def _local_capacity(sweep: Sweep) -> dict[str, float]:
    """What a local Ray started by the sweep would offer (ray.num_cpus / num_gpus, else this machine's)."""
    cpus = sweep.file.ray.num_cpus or os.cpu_count() or 1
    gpus = sweep.file.ray.num_gpus
    if gpus is None:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cpu": float(cpus), "gpu": float(gpus)}


def describe_plan(sweep: Sweep, *, resume: bool = False, address: str | None = None,
                  new_name_if_taken: bool = True) -> str:
    """The plan as text; raises :class:`SweepInputError` where the real run would refuse to start."""
    notes: list[str] = []
    if resume:
        sweep = sweep_to_resume(sweep.sweep_dir)
    else:
        sweep = choose_name(sweep, new_name_if_taken, notes.append)

    tracking: dict[str, Any] = {"enabled": sweep.file.mlflow.enabled}
    if sweep.file.mlflow.enabled:
        uri = sweep.tracking_uri
        try:
            check_tracking(uri, create=False)
        except TrackingUnavailable as err:
            raise SweepInputError(str(err)) from None
        tracking.update(tracking_uri=uri, experiment=sweep.experiment, parent_run=sweep.name)

    target = ray_address(sweep, address)
    res = sweep.resources
    if target:
        try:
            probe_address(target)
            check_ray_token(target)
        except ConnectionError as err:
            raise SweepInputError(f"Ray: cannot start or connect to {target}: {err}") from None
        except RayTokenRefused as err:
            raise SweepInputError(f"Ray: {err}") from None
        ray_plan: dict[str, Any] = {"address": target, "resources": "checked when connected"}
        concurrent = sweep.search.max_concurrent
    else:
        capacity = _local_capacity(sweep)
        missing = [f"{name} {need:g} > {capacity[name]:g}" for name, need in (("cpu", res.cpu), ("gpu", res.gpu))
                   if need > capacity[name]]
        if missing:
            raise SweepInputError(f"resources: a trial asks for more than the Ray cluster has ({', '.join(missing)})")
        fits = min(int(capacity[k] // need) for k, need in (("cpu", res.cpu), ("gpu", res.gpu)) if need > 0)
        concurrent = min(sweep.search.max_concurrent, fits)
        ray_plan = {"address": "a local Ray started for the sweep", "capacity": capacity}

    plan = {
        "name": sweep.name,
        "results": str(sweep.sweep_dir),
        "resume": resume,
        "overrides": overrides_text(sweep.overrides) or None,
        "trials": {"num_samples": sweep.search.num_samples, "epochs": sweep.epochs,
                   "at_once": concurrent, "sampler": sweep.search.sampler, "seed": sweep.search.seed,
                   "scheduler": sweep.scheduler.model_dump(), "objective": sweep.objective.type,
                   "points_to_evaluate": len(sweep.points)},
        "resources_per_trial": res.model_dump(),
        "ray": ray_plan,
        "tracking": tracking,
    }
    space = {"searched": sp.describe(sweep.params), "fixed": sweep.fixed, "points_to_evaluate": sweep.points}
    dump = lambda doc: yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110).rstrip()  # noqa: E731
    parts = [*notes,
             "# losstune sweep --dry-run: nothing was started or written",
             "# plan", dump(plan),
             "# search space", dump(space),
             "# resolved config", dump(sweep.raw if resume else {**sweep.raw, "name": sweep.name})]
    return "\n".join(parts)
