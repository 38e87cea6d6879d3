"""The parameter specs of a search space: one pydantic model per ``type`` of a space entry (uniform,
loguniform, int, choice, fixed), each with its Optuna distribution, its midpoint and extremes (the values
the config check tries), membership, and the encoding of its values for Optuna.

Optuna only stores primitive categorical values (None, bool, int, float, str). A choice with any
non-primitive value (a list, a dict) is encoded as index-labelled strings (``"0:[8, 16]"``) and
decoded by label lookup, so any YAML value round-trips exactly:

>>> choice = parse_spec({"type": "choice", "values": [[8, 16], [16, 32]]})
>>> choice.encode([16, 32]), choice.decode("1:[16, 32]")
('1:[16, 32]', [16, 32])
>>> parse_spec({"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}).midpoint()
0.001
"""

from __future__ import annotations

import copy
import json
import math
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union

import optuna
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

PRIMITIVES = (type(None), bool, int, float, str)  # the values Optuna stores in a categorical distribution


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def distribution(self) -> optuna.distributions.BaseDistribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, value: Any) -> Any:
        return value

    def contains(self, value: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class _FloatRange(_Param):
    """What ``uniform`` and ``loguniform`` share: a closed float range [low, high]."""
    log: ClassVar[bool] = False  # sampled on a log scale (as IntParam.log)
    low: float
    high: float

    def decode(self, value: Any) -> float:
        return float(value)

    def extremes(self) -> list[float]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and self.low <= value <= self.high)


class UniformParam(_FloatRange):
    type: Literal["uniform"]
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "UniformParam":
        if not self.low < self.high:
            raise ValueError(f"high: empty range: low ({self.low}) must be < high ({self.high})")
        return self

    def distribution(self):
        return optuna.distributions.FloatDistribution(self.low, self.high, step=self.step)

    def midpoint(self) -> float:
        mid = (self.low + self.high) / 2
        if self.step:
            mid = self.low + round((mid - self.low) / self.step) * self.step
        return min(mid, self.high)

    def describe(self) -> str:
        return f"uniform[{self.low:g}, {self.high:g}]" + (f" step {self.step:g}" if self.step else "")


class LogUniformParam(_FloatRange):
    log: ClassVar[bool] = True
    type: Literal["loguniform"]

    @model_validator(mode="after")
    def _check(self) -> "LogUniformParam":
        if self.low <= 0:
            raise ValueError(f"low: loguniform needs low > 0 (got {self.low}); use uniform for ranges that include 0")
        if not self.low < self.high:
            raise ValueError(f"high: empty range: low ({self.low}) must be < high ({self.high})")
        return self

    def distribution(self):
        return optuna.distributions.FloatDistribution(self.low, self.high, log=True)

    def midpoint(self) -> float:
        return math.sqrt(self.low * self.high)

    def describe(self) -> str:
        return f"loguniform[{self.low:g}, {self.high:g}]"


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        if not self.low < self.high:
            raise ValueError(f"high: empty range: low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"low: a log int range needs low > 0 (got {self.low})")
        if self.log and self.step != 1:
            raise ValueError("step: a log int range needs step 1")
        return self

    def distribution(self):
        return optuna.distributions.IntDistribution(self.low, self.high, step=self.step, log=self.log)

    def decode(self, value: Any) -> int:
        return int(value)

    def midpoint(self) -> int:
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return int(self.low + round((mid - self.low) / self.step) * self.step)

    def extremes(self) -> list[int]:
        return [self.low, self.low + (self.high - self.low) // self.step * self.step]

    def describe(self) -> str:
        return f"int[{self.low}, {self.high}]" + (f" step {self.step}" if self.step != 1 else "") + \
            (" log" if self.log else "")

    def contains(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)


class ChoiceParam(_Param):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ChoiceParam":
        keys = [_canonical(v) for v in self.values]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"values: duplicate choice value(s): {', '.join(dupes)}")
        return self

    @property
    def encoded(self) -> bool:
        """True when the values are stored in Optuna as index-labelled strings."""
        return not all(isinstance(v, PRIMITIVES) for v in self.values)

    def labels(self) -> list[Any]:
        if not self.encoded:
            return list(self.values)
        return [f"{i}:{_canonical(v)}" for i, v in enumerate(self.values)]

    def distribution(self):
        return optuna.distributions.CategoricalDistribution(self.labels())

    def _index(self, value: Any) -> int | None:
        key = _canonical(value)
        for i, v in enumerate(self.values):
            if _canonical(v) == key and type(v) is type(value):
                return i
        for i, v in enumerate(self.values):  # 1 == 1.0, [8, 16] given as a tuple ...
            if _canonical(v) == key:
                return i
        return None

    def encode(self, value: Any) -> Any:
        i = self._index(value)
        if i is None:
            raise ValueError(f"{value!r} is not one of the choices {self.values!r}")
        return self.labels()[i]

    def decode(self, value: Any) -> Any:
        labels = self.labels()
        for label, real in zip(labels, self.values):
            if label == value and type(label) is type(value):
                return copy.deepcopy(real)
        for label, real in zip(labels, self.values):
            if label == value:
                return copy.deepcopy(real)
        raise ValueError(f"{value!r} is not one of the encoded choices {labels!r}")

    def contains(self, value: Any) -> bool:
        return self._index(value) is not None

    def midpoint(self) -> Any:
        return copy.deepcopy(self.values[0])

    def extremes(self) -> list[Any]:
        return [copy.deepcopy(v) for v in self.values]

    def describe(self) -> str:
        return "choice" + json.dumps(self.values, default=str)


class FixedParam(_Param):
    type: Literal["fixed"]
    value: Any


ParamSpec = Union[UniformParam, LogUniformParam, IntParam, ChoiceParam]
PARAM_TYPES = ("uniform", "loguniform", "int", "choice", "fixed")
_ADAPTER = TypeAdapter(Annotated[Union[UniformParam, LogUniformParam, IntParam, ChoiceParam, FixedParam],
                                 Field(discriminator="type")])


def parse_spec(raw: Mapping[str, Any]) -> ParamSpec | FixedParam:
    """A mapping with a known ``type`` -> its spec; pydantic's ``ValidationError`` (its locations start with
    the type tag) when a field is missing, unknown or out of range."""
    return _ADAPTER.validate_python(dict(raw))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)
