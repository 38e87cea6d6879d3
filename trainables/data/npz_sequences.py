"""Real laser-solidification sequences from one ``.npz`` file (``data.npz``).

Layout (``numpy.savez``/``savez_compressed``):

==================  ==========================================================================
key                 content
==================  ==========================================================================
``micro``           microstructure frames, RGB: ``[T, H, W, 3]`` (one sequence) or
                    ``[S, T, H, W, 3]`` (``S`` sequences of equal length). Float in [0, 1], or
                    ``uint8`` in 0..255 (divided by 255).
``temperature``     temperature of the same frames: ``[T, H, W]`` or ``[S, T, H, W]`` (the shape
                    of ``micro`` without the channel axis), in kelvin or degrees Celsius.
``temperature_unit`` optional string: ``"K"`` (or ``"kelvin"``) / ``"C"`` (``"celsius"``, ``"degC"``),
                    case-insensitive.
==================  ==========================================================================

Unit rule when ``temperature_unit`` is missing: degrees Celsius if the minimum temperature is
below 250, else kelvin. (A kelvin field of a real process never drops below ~250 K, while a
Celsius field at room temperature reads ~20.) Celsius data whose coldest point is 250 °C or
more (strong preheat) would be read as kelvin, so store ``temperature_unit`` for such data.
Temperatures are returned in kelvin; a field that is below 0 K after conversion is refused.

Every problem raises :class:`ValueError` naming the config key, the file and the array key, e.g.
``data.npz: /data/run1.npz: 'micro' must have shape [T,H,W,3] or [S,T,H,W,3], got (5, 32, 32)``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from losstune.trainables.data.solidification import Sequences

CELSIUS_GUESS_BELOW = 250.0
KELVIN_NAMES = {"k", "kelvin"}
CELSIUS_NAMES = {"c", "celsius", "degc", "°c"}
# floats may overshoot [0, 1] by this much (rounding); they are clipped
RANGE_TOLERANCE = 1e-3


def load_npz_sequences(path: str | Path, *, label: str = "data.npz") -> Sequences:
    """Load ``path`` in the layout above.

    Returns ``Sequences(micro[S,T,H,W,3] float32 in [0, 1], temperature[S,T,H,W] float32 kelvin)``;
    ``label`` (the config key) starts every error message.
    """
    path = Path(path).expanduser()
    where = f"{label}: {path}"

    def fail(message: str) -> ValueError:
        return ValueError(f"{where}: {message}")

    if not path.is_file():
        raise fail("file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise fail(f"not a readable .npz file ({err})") from None
    for key in ("micro", "temperature"):
        if key not in arrays:
            raise fail(f"missing key {key!r} (keys present: {sorted(arrays)})")

    micro = arrays["micro"]
    if micro.ndim == 4:
        micro = micro[None]
    if micro.ndim != 5 or micro.shape[-1] != 3:
        raise fail(f"'micro' must have shape [T,H,W,3] or [S,T,H,W,3], got {tuple(arrays['micro'].shape)}")
    if min(micro.shape[:4]) < 1:
        raise fail(f"'micro' is empty: shape {tuple(arrays['micro'].shape)}")
    if micro.dtype == np.uint8:
        micro = micro.astype(np.float32) / 255.0
    elif np.issubdtype(micro.dtype, np.floating):
        micro = micro.astype(np.float32)
        if not np.isfinite(micro).all():
            raise fail("'micro' contains NaN or infinite values")
        lo, hi = float(micro.min()), float(micro.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise fail(f"'micro' values must lie in [0, 1] (or be uint8 0..255), got [{lo:.4g}, {hi:.4g}]")
        micro = micro.clip(0.0, 1.0)
    else:
        raise fail(f"'micro' must be float in [0, 1] or uint8, got dtype {micro.dtype}")

    temperature = arrays["temperature"]
    if temperature.ndim == 3 and arrays["micro"].ndim == 4:
        temperature = temperature[None]
    if temperature.shape != micro.shape[:-1]:
        expected = "[T,H,W]" if arrays["micro"].ndim == 4 else "[S,T,H,W]"
        raise fail(f"'temperature' must have shape {expected} = {tuple(arrays['micro'].shape[:-1])} "
                   f"(that of 'micro' without the channel axis), got {tuple(arrays['temperature'].shape)}")
    if not (np.issubdtype(temperature.dtype, np.floating) or np.issubdtype(temperature.dtype, np.integer)):
        raise fail(f"'temperature' must be numeric, got dtype {temperature.dtype}")
    temperature = temperature.astype(np.float32)
    if not np.isfinite(temperature).all():
        raise fail("'temperature' contains NaN or infinite values")

    unit = _unit(arrays.get("temperature_unit"), temperature, fail)
    if unit == "C":
        temperature = temperature + np.float32(273.15)
    if float(temperature.min()) < 0:
        raise fail(f"'temperature' is below 0 K after reading it as {'°C' if unit == 'C' else 'K'} "
                   f"(min {float(temperature.min()):.4g} K); check 'temperature_unit'")
    return Sequences(np.ascontiguousarray(micro), np.ascontiguousarray(temperature))


def _unit(raw, temperature: np.ndarray, fail) -> str:
    if raw is None:
        return "C" if float(temperature.min()) < CELSIUS_GUESS_BELOW else "K"
    value = raw.item() if isinstance(raw, np.ndarray) and raw.size == 1 else raw
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    name = str(value).strip().lower() if isinstance(value, (str, np.str_)) else None
    if name in KELVIN_NAMES:
        return "K"
    if name in CELSIUS_NAMES:
        return "C"
    raise fail(f"'temperature_unit' must be 'K' or 'C', got {value!r}")
