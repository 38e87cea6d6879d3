"""What a verification trains: the top-k configs of a sweep and their matched baselines on fresh seeds.

Each planned run is one training config; its key is a hash of that config, so a run is trained once
whatever asks for it (a pixel-only top config and its own baseline are the same run) and a later
``losstune verify`` with more seeds or more configs finds the runs it already has. Fresh seeds are the
smallest integers from 1 up that no trial of the sweep used as ``seed`` or ``data.seed``; they are the
same on every call, so ``--seeds 5`` after ``--seeds 3`` adds two seeds to the same three.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from losstune.search.trials import SweepResults
from losstune.search.verify_stats import BASELINE, TUNED
from losstune.trainables.terms import matched_baseline, shaping_weight_names


class VerifyInputError(ValueError):
    """A verification cannot be planned from what the user gave (exit 2, nothing written)."""


@dataclass(frozen=True)
class PlannedRun:
    key: str          # identifies the training config (hash); shared by identical runs
    trial_id: str     # the sweep trial whose config this verifies
    arm: str          # "tuned" (the trial's config) or "baseline" (its matched baseline)
    seed: int
    config: Mapping[str, Any]


def used_seeds(results: SweepResults) -> set[int]:
    """Every ``seed`` / ``data.seed`` a trial of the sweep trained with."""
    used = set()
    for trial_id in results.table["trial_id"]:
        config = results.trial_config(trial_id)
        for value in (config.get("seed"), (config.get("data") or {}).get("seed")):
            if isinstance(value, int):
                used.add(value)
    return used


def fresh_seeds(results: SweepResults, n: int) -> list[int]:
    used, seeds, candidate = used_seeds(results), [], 1
    while len(seeds) < n:
        if candidate not in used:
            seeds.append(candidate)
        candidate += 1
    return seeds


def with_seed(config: Mapping[str, Any], seed: int, epochs: int) -> dict[str, Any]:
    """The config trained on ``seed`` (model init, batch order and, through ``data.seed``, the data) for
    ``epochs``; a task that derives its data seed from ``seed`` (``data.seed`` unset) follows it anyway."""
    out = copy.deepcopy(dict(config))
    out["seed"], out["epochs"] = int(seed), int(epochs)
    if isinstance(out.get("data"), dict) and out["data"].get("seed") is not None:
        out["data"]["seed"] = int(seed)
    return out


def run_key(config: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{digest}-s{config['seed']}"


def top_trials(results: SweepResults, top_k: int) -> list[str]:
    """The ``top_k`` best trials by the sweep's objective (the ones ``best.yaml`` would be chosen from)."""
    ranked = list(results.ranked()["trial_id"])
    if top_k > len(ranked):
        raise VerifyInputError(f"--top-k: {top_k} is more than the {len(ranked)} trial(s) of the sweep with a "
                               "result (failed and diverged trials cannot be verified)")
    return ranked[:top_k]


def shaping_weights(config: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(config.get(name) or 0.0) for name in shaping_weight_names(config)}


def plan(results: SweepResults, trial_ids: list[str], seeds: list[int], epochs: int) -> list[PlannedRun]:
    """Every (trial, arm, seed) to train, in a stable order."""
    runs = []
    for trial_id in trial_ids:
        tuned = results.trial_config(trial_id)
        for arm, config in ((TUNED, tuned), (BASELINE, matched_baseline(tuned))):
            for seed in seeds:
                seeded = with_seed(config, seed, epochs)
                runs.append(PlannedRun(run_key(seeded), trial_id, arm, seed, seeded))
    return runs
