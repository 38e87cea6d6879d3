"""The training config: one flat, validated record per run (a sweep trial or a final training).

Loss weights are top-level keys (``gradient_weight``, ``perceptual_weight`` ...) so a search
space names them directly; task-specific settings live in the ``data`` and ``model`` dicts
and are validated by the task itself (errors name e.g. ``data.size``). The built-in weights are
fields here; a plug-in task's own terms (:mod:`trainables.terms`) add their ``<term>_weight`` keys
for that task only, read as ``config.<term>_weight``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Mapping

from losstune.losses.metrics import DEFAULT_COMPOSITE_WEIGHTS
from losstune.trainables import terms
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# a model-level check whose message starts with the field it is about ("device: ...")
_FIELD_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): ")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field (dotted path)."""


class TrainConfig(BaseModel):
    # extra keys are accepted only when they are weights of the task's own declared terms (_check_extra)
    model_config = ConfigDict(extra="allow")

    task: str = "microstructure"
    seed: int = 0
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 turns clipping off")
    device: str = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    preload: bool = True
    num_threads: int | None = Field(None, ge=1)

    # loss weights and loss settings
    pixel_weight: float = Field(terms.PIXEL.default_weight, ge=0)
    pixel_loss: Literal["mse", "l1", "charbonnier"] = "mse"
    gradient_weight: float = Field(terms.GRADIENT.default_weight, ge=0)
    gradient_mode: Literal["match", "sharpen"] = "match"
    perceptual_weight: float = Field(terms.PERCEPTUAL.default_weight, ge=0)
    perceptual_weights_path: str | None = None
    intensity_weight: float = Field(terms.INTENSITY.default_weight, ge=0)
    diffusion_weight: float = Field(terms.DIFFUSION.default_weight, ge=0)
    warmup_steps: int = Field(0, ge=0)
    solidification_weighting: bool = False
    T_solidus: float = 1600.0
    T_liquidus: float = 1700.0

    composite_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_COMPOSITE_WEIGHTS))
    # where the composite is scored: the task's evaluation region (``active``), the whole frame
    # (``full``), or ``auto`` = active when the task gives a region, else full
    objective_region: Literal["auto", "active", "full"] = "auto"

    data: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_yaml_bool(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `amp: off` / `amp: on` as a boolean
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        # ``model: ddpm`` is shorthand for ``model: {name: ddpm}``
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_extra(self) -> "TrainConfig":
        """Extra keys must be weights of the task's declared terms; missing ones take their default."""
        extra = self.__pydantic_extra__
        declared = {}
        if extra or ":" in self.task:  # only a plug-in declares weights beyond the fields
            try:
                declared = {t.weight_key: t for t in terms.loss_terms(self.task)
                            if t.weight_key not in type(self).model_fields}
            except ConfigError:
                if extra:  # the keys cannot be checked: the task is the problem
                    raise
        for key in extra:
            if key not in declared:
                raise ValueError(f"{key}: unknown key (not allowed here)")
        for key, term in declared.items():
            value = extra.get(key, term.default_weight)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{key}: must be a finite number >= 0, got {value!r}")
            extra[key] = float(value)
        return self

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.T_solidus >= self.T_liquidus:
            raise ValueError(f"T_solidus ({self.T_solidus}) must be below T_liquidus ({self.T_liquidus})")
        unknown = set(self.composite_weights) - set(DEFAULT_COMPOSITE_WEIGHTS)
        if unknown:
            raise ValueError(f"composite_weights: unknown metric(s) {sorted(unknown)}; "
                             f"known: {sorted(DEFAULT_COMPOSITE_WEIGHTS)}")
        if any(w < 0 for w in self.composite_weights.values()):
            raise ValueError("composite_weights: weights must be >= 0")
        if self.device != "auto" and not self.device.split(":")[0] in ("cpu", "cuda", "mps"):
            raise ValueError(f"device: {self.device!r} is not auto, cpu, cuda, cuda:N or mps")
        return self


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming its dotted field path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        named = _FIELD_MESSAGE.match(msg) if not loc else None
        if named:  # a model-level check about one field: name it in the path
            loc, msg = named.group(1), msg[named.end():]
        path = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def parse_train_config(raw: Mapping[str, Any] | TrainConfig, prefix: str = "") -> TrainConfig:
    """Validate a raw mapping; raise :class:`ConfigError` naming the bad field(s)."""
    if isinstance(raw, TrainConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix)) from None


def parse_section(model: type[BaseModel], raw: Mapping[str, Any] | None, prefix: str) -> BaseModel:
    """Validate a task's ``data``/``model`` section; errors are named ``<prefix>.<field>``."""
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix + ".")) from None
