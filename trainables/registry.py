"""Find a task factory by name: a built-in (``microstructure``, ``microscopy``) or ``module.path:function``."""

from __future__ import annotations

import importlib

from losstune.trainables.config import ConfigError
from losstune.trainables.task import TaskFactory

BUILTIN_TASKS = {
    "microstructure": "losstune.trainables.tasks.microstructure:build",
    "microscopy": "losstune.trainables.tasks.microscopy:build",
}


def get_task_factory(name: str) -> TaskFactory:
    """Resolve ``name`` to a callable ``factory(config) -> Task``; :class:`ConfigError` names ``task``."""
    target = BUILTIN_TASKS.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"task: unknown task {name!r}; built-in tasks are {sorted(BUILTIN_TASKS)}, "
            "a plug-in is named 'package.module:function'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"task: cannot import module {module_name!r} for task {name!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"task: {module_name!r} has no callable {attr!r} (from task {name!r})")
    return factory
