"""The sweep config's ``verify:`` section: on in the shipped configs, off in smoke.yaml, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from losstune.search.config import SweepConfigError, load_sweep, validate_sweep

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, on", [("quickstart", True), ("microstructure", True), ("microscopy", True),
                                      ("smoke", False)])
def test_shipped_configs(name, on):
    sweep = load_sweep(CONFIGS / f"{name}.yaml", deep=False)
    assert (sweep.verify is not None) == on
    if on:
        assert sweep.verify.seeds >= 2 and sweep.verify.top_k >= 1 and sweep.verify.epochs is None


@pytest.mark.parametrize("section, message", [
    ({"seeds": 1}, "verify.seeds: Input should be greater than or equal to 2"),
    ({"top_k": 0}, "verify.top_k: Input should be greater than or equal to 1"),
    ({"epochs": 0}, "verify.epochs: Input should be greater than or equal to 1"),
    ({"sedes": 3}, "verify.sedes: unknown key"),
])
def test_bad_verify_section_names_the_field(section, message):
    raw = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    raw["verify"] = section
    with pytest.raises(SweepConfigError) as err:
        validate_sweep(raw, source="x.yaml", deep=False, check_paths=False)
    assert str(err.value).startswith(f"x.yaml: {message}"), str(err.value)
