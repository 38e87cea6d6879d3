"""The runnable examples in the docstrings: every module of losses/, the search space and its parameter
specs, the loss-term registry, the trial-status vocabulary, the number formats, the MLflow helper process and the
driver's settings while Tune runs. An example that no
longer runs fails here."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import losstune.losses

MODULES = sorted([f"losstune.losses.{m.name}" for m in pkgutil.iter_modules(losstune.losses.__path__)] + [
    "losstune.search.space", "losstune.search.param_specs", "losstune.search.status", "losstune.search.formatting",
    "losstune.search.study", "losstune.search.tracking.store", "losstune.search.tracking.store_process",
    "losstune.search.ray_session", "losstune.trainables.terms", "losstune.trainables.data.augment"])
# the modules whose public functions must show an example
WITH_EXAMPLES = {"losstune.losses.pixel", "losstune.losses.gradient", "losstune.losses.intensity",
                 "losstune.losses.weighting", "losstune.losses.diffusion", "losstune.losses.perceptual",
                 "losstune.losses.combined", "losstune.search.space", "losstune.search.param_specs",
                 "losstune.search.status", "losstune.search.formatting", "losstune.search.study",
                 "losstune.search.tracking.store_process", "losstune.trainables.terms",
                 "losstune.trainables.data.augment"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name}: no runnable example"
