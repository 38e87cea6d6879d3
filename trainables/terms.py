"""Which loss weights of a training config are shaping terms, and the config's matched baseline.

Minimal stand-in: the loss-term registry (issue 9) replaces this module with the same two functions.
Built-in tasks: the shaping weights are ``gradient_weight``, ``perceptual_weight`` and ``intensity_weight``
(the primary term, ``pixel_weight`` / ``diffusion_weight``, is not one). A plug-in task (``module:function``):
every ``*_weight`` key of the config except those two primary ones.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

BUILTIN_TASKS = ("microstructure", "microscopy")
BUILTIN_SHAPING_WEIGHTS = ("gradient_weight", "perceptual_weight", "intensity_weight")
PRIMARY_WEIGHTS = ("pixel_weight", "diffusion_weight")


def shaping_weight_names(config: Mapping[str, Any]) -> list[str]:
    """The ``<term>_weight`` keys of the shaping terms of a flat training config.

    >>> shaping_weight_names({"task": "microstructure", "pixel_weight": 1.0, "gradient_weight": 0.2})
    ['gradient_weight', 'perceptual_weight', 'intensity_weight']
    >>> shaping_weight_names({"task": "my_pkg.tasks:build", "pixel_weight": 1.0, "edge_weight": 0.3})
    ['edge_weight']
    """
    if config.get("task", "microstructure") in BUILTIN_TASKS:
        return list(BUILTIN_SHAPING_WEIGHTS)
    return [k for k in config if k.endswith("_weight") and k not in PRIMARY_WEIGHTS]


def matched_baseline(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with every shaping weight set to 0 (same lr, warm-up, model, epochs, seed).

    >>> baseline = matched_baseline({"task": "microstructure", "lr": 0.003, "gradient_weight": 0.2})
    >>> baseline["lr"], baseline["gradient_weight"], baseline["perceptual_weight"]
    (0.003, 0.0, 0.0)
    """
    baseline = copy.deepcopy(dict(config))
    for name in shaping_weight_names(config):
        baseline[name] = 0.0
    return baseline
