"""A trial's pictures of its validation predictions, written into each checkpoint (numpy + Pillow only).

Imported by every trial process, so it stays cheap: :func:`capture_trial_artifacts` takes the first
validation predictions of a trainer (``Trainer.predict_val``) and its config; :func:`write_trial_artifacts`
then writes ``predictions.npz`` (input/baseline/prediction/target), ``predictions.png`` (a small labelled
grid), its ``predictions.webp`` thumbnail (what MLflow's image-series chart shows) and the trial's training
config ``config.yaml`` into a checkpoint directory. The report's figures are in :mod:`search.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

PREDICTIONS_NPZ = "predictions.npz"
PREDICTIONS_PNG = "predictions.png"
PREDICTIONS_THUMB = "predictions.webp"  # MLflow's image-series thumbnail, made where the image is made
THUMB_SIZE = 256  # MLflow's COMPRESSED_IMAGE_SIZE: the thumbnail's longer side
TRIAL_CONFIG = "config.yaml"
PRED_KEYS = ("input", "baseline", "prediction", "target")
NUM_SAMPLES = 4



def to_display(image: np.ndarray) -> np.ndarray:
    """One C×H×W image in [0, 1] -> H×W (grey) or H×W×3 (RGB) float array for display."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if image.ndim == 2:
        return np.clip(image, 0, 1)
    if image.ndim != 3:
        raise ValueError(f"expected C×H×W, got shape {image.shape}")
    c = image.shape[0]
    out = image.transpose(1, 2, 0) if c == 3 else image[0]
    return np.clip(out, 0, 1)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (to_display(image) * 255 + 0.5).astype(np.uint8)


def _tile(image: np.ndarray, size: int):
    from PIL import Image
    arr = _to_uint8(image)
    tile = Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L").convert("RGB")
    h, w = arr.shape[:2]
    scale = size / max(h, w)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return tile.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def prediction_grid(arrays: Mapping[str, np.ndarray], keys: Sequence[str] = PRED_KEYS, title: str | None = None,
                    tile: int | None = None):
    """A labelled grid (PIL image): one column per key (input, baseline, prediction, target), one row per sample."""
    from PIL import Image, ImageDraw
    keys = [k for k in keys if k in arrays]
    if not keys:
        raise ValueError("no images to draw")
    n = min(len(arrays[k]) for k in keys)
    h, w = np.asarray(arrays[keys[0]]).shape[-2:]
    size = tile or int(min(128, max(64, max(h, w))))
    tiles = [[_tile(arrays[k][i], size) for k in keys] for i in range(n)]
    tw, th = tiles[0][0].size
    pad, head = 4, 18 + (18 if title else 0)
    grid = Image.new("RGB", (pad + len(keys) * (tw + pad), head + n * (th + pad)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(12)
    if title:
        draw.text((pad, 2), title, fill="black", font=font)
    for j, k in enumerate(keys):
        draw.text((pad + j * (tw + pad), head - 16), k, fill="black", font=font)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            grid.paste(t, (pad + j * (tw + pad), head + i * (th + pad)))
    return grid


def capture_trial_artifacts(trainer, n: int = NUM_SAMPLES, title: str | None = None) -> dict[str, Any]:
    """What :func:`write_trial_artifacts` needs of a trainer, taken now (its model moves on as it trains):
    the first ``n`` validation predictions (one small forward pass) and its config."""
    return {"arrays": {k: v.numpy() for k, v in trainer.predict_val(n).items()}, "epoch": trainer.epoch,
            "title": title or f"{trainer.config.task}, epoch {trainer.epoch}", "config": trainer.config.model_dump()}


def write_trial_artifacts(directory: str | Path, captured: Mapping[str, Any]) -> dict[str, Path]:
    """Encode and write what :func:`capture_trial_artifacts` took (the slow part; needs no model, so a trial
    can do it while the next epoch trains)."""
    import yaml
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = captured["arrays"]
    npz = directory / PREDICTIONS_NPZ
    np.savez_compressed(npz, epoch=np.int64(captured["epoch"]),
                        **{k: v.astype(np.float16) for k, v in arrays.items()})
    png = directory / PREDICTIONS_PNG
    grid = prediction_grid(arrays, title=captured["title"])
    grid.save(png, compress_level=1)  # fast: written every epoch
    thumb = directory / PREDICTIONS_THUMB
    save_thumbnail(grid, thumb)
    cfg = directory / TRIAL_CONFIG
    cfg.write_text(yaml.safe_dump(captured["config"], sort_keys=False, default_flow_style=None))
    return {"npz": npz, "png": png, "thumb": thumb, "config": cfg}


def save_thumbnail(image, path_or_file, size: int = THUMB_SIZE) -> None:
    """``image`` scaled so its longer side is ``size`` (as MLflow's ``log_image`` does), as a fast WebP.

    Made in the trial, next to the PNG, so that the sweep's single MLflow writer only files bytes: in
    ``MlflowClient.log_image`` this resize + encode and a second PNG encode cost ~30 ms per image.
    """
    w, h = image.size
    scale = size / max(w, h)
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))))
    small.save(path_or_file, format="WEBP", method=0)  # method 0: the fastest encoder setting


def load_predictions(source) -> dict[str, np.ndarray]:
    """The arrays of a ``predictions.npz`` (path or file object) as float32."""
    with np.load(source) as data:
        return {k: data[k].astype(np.float32) for k in data.files}
