"""losstune: tune the loss weights of image-to-image models with Optuna on Ray Tune, tracked in MLflow.

The repository keeps its layout (``search/``, ``trainables/``, ``losses/`` at the top); they are
installed as ``losstune.search``, ``losstune.trainables`` and ``losstune.losses`` so that a user's own
``losses`` or ``search`` package can never shadow them.

The public API is imported on first use, so ``import losstune`` stays cheap in every trial process:

>>> import losstune
>>> losstune.__version__ != ""
True
>>> sorted(losstune.__all__)
['load_sweep', 'run_sweep', 'train']
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("losstune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:  # the typed public API, for type checkers and IDEs
    from losstune.search.config import load_sweep
    from losstune.search.runner import run_sweep
    from losstune.trainables.loop import train

_PUBLIC = {
    "load_sweep": "losstune.search.config",
    "run_sweep": "losstune.search.runner",
    "train": "losstune.trainables.loop",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'losstune' has no attribute {name!r}")
