"""Paired image folders: ``input_dir/NAME.ext`` ↔ ``target_dir/NAME.ext``.

* Files pair by name without extension (``a.tif`` pairs with ``a.png``); PNG (pillow), TIFF
  (tifffile) and ``.npy``; 8/16-bit integer or float; RGB(A) is converted to grey.
* Each image is percentile-normalised on its own (``low``/``high`` percentiles → 0/1, clipped).
* ``crops_per_image`` random ``crop_size``² crops per pair, the same window in input and target,
  deterministic from the seed (each file's crops depend only on the seed and its name).
* Train and validation are split by image (no image gives crops to both); the validation images
  give at least ``min_val_crops`` crops in all (more crops per image when there are few images).

Every problem raises :class:`ValueError` naming the folder or file: a missing or empty folder,
names present in one folder but not the other, an unreadable image, mismatched shapes, an image
smaller than the crop.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
_RGB_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_SHOWN = 5  # names listed in error messages


def _to_grey(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.squeeze(arr)
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4):        # H×W×RGB(A)
            arr = arr[..., :3].astype(np.float64) @ _RGB_WEIGHTS
        elif arr.shape[0] in (3, 4):       # RGB(A)×H×W
            arr = np.tensordot(_RGB_WEIGHTS, arr[:3].astype(np.float64), axes=1)
        elif arr.shape[-1] == 2:           # grey + alpha
            arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D grey or RGB image, got array shape {arr.shape}")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """One image as a 2-D float32 array in its own units (grey; RGB is converted)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile
            arr = tifffile.imread(path)
        elif suffix == ".png":
            from PIL import Image
            with Image.open(path) as img:
                if img.mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
                arr = np.asarray(img)
        else:
            raise ValueError(f"unsupported file type {suffix!r} (use {', '.join(IMAGE_SUFFIXES)})")
    except Exception as err:  # noqa: BLE001 - every reader has its own exception types
        raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{path}: cannot read image (unsupported data type {arr.dtype})")
    arr = _to_grey(arr, path).astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: image contains NaN or infinite values")
    return arr


def percentile_normalize(img: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of ``img`` to 0/1 and clip to [0, 1] (a constant image gives 0)."""
    lo, hi = np.percentile(img, [low, high])
    scale = hi - lo
    if scale <= 0:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / scale, 0.0, 1.0).astype(np.float32)


def list_images(folder: str | Path, role: str = "folder") -> dict[str, Path]:
    """The images in ``folder`` by name without extension (hidden files and other types are ignored)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"{role}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{role}: {str(folder)!r} is not a folder")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise ValueError(f"{role}: two images named {path.stem!r} in {str(folder)!r}: "
                             f"{images[path.stem].name} and {path.name}")
        images[path.stem] = path
    if not images:
        raise ValueError(f"{role}: folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:_SHOWN])
    return shown + (f" … ({len(names)} in all)" if len(names) > _SHOWN else "")


def pair_files(input_dir: str | Path, target_dir: str | Path, *, input_role: str = "input_dir",
               target_role: str = "target_dir") -> list[tuple[Path, Path]]:
    """(input, target) paths matched by name; names found in only one folder raise ValueError."""
    inputs = list_images(input_dir, input_role)
    targets = list_images(target_dir, target_role)
    only_input = sorted(set(inputs) - set(targets))
    only_target = sorted(set(targets) - set(inputs))
    if only_input or only_target:
        parts = []
        if only_input:
            parts.append(f"only in {input_role} {str(input_dir)!r}: {_names([inputs[k].name for k in only_input])}")
        if only_target:
            parts.append(f"only in {target_role} {str(target_dir)!r}: "
                         f"{_names([targets[k].name for k in only_target])}")
        raise ValueError(f"{input_role}/{target_role}: input and target images do not pair up by name; "
                         + "; ".join(parts))
    return [(inputs[name], targets[name]) for name in sorted(inputs)]


def _file_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def load_pairs(pairs: Sequence[tuple[Path, Path]], *, crop_size: int, crops_per_image: int = 4,
               percentiles: tuple[float, float] = (1.0, 99.8), seed: int = 0,
               crop_role: str = "crop_size") -> dict[str, torch.Tensor]:
    """Read, normalise and crop ``pairs``: ``{"input", "target"}`` of (len(pairs)·crops_per_image)×1×crop×crop."""
    low, high = percentiles
    inputs, targets = [], []
    for input_path, target_path in pairs:
        inp, tgt = read_image(input_path), read_image(target_path)
        if inp.shape != tgt.shape:
            raise ValueError(f"shape mismatch: input {input_path} is {inp.shape[0]}×{inp.shape[1]}, "
                             f"target {target_path} is {tgt.shape[0]}×{tgt.shape[1]}")
        height, width = inp.shape
        if height < crop_size or width < crop_size:
            raise ValueError(f"{input_path}: image is {height}×{width}, smaller than {crop_role} {crop_size}")
        inp, tgt = percentile_normalize(inp, low, high), percentile_normalize(tgt, low, high)
        rng = _file_seed(seed, input_path.stem)
        ys = rng.integers(0, height - crop_size + 1, crops_per_image)
        xs = rng.integers(0, width - crop_size + 1, crops_per_image)
        for y, x in zip(ys, xs):
            inputs.append(inp[y:y + crop_size, x:x + crop_size])
            targets.append(tgt[y:y + crop_size, x:x + crop_size])
    return {"input": torch.from_numpy(np.stack(inputs)[:, None].copy()),
            "target": torch.from_numpy(np.stack(targets)[:, None].copy())}


def load_paired_folders(input_dir: str | Path, target_dir: str | Path, *, crop_size: int,
                        crops_per_image: int = 4, percentiles: tuple[float, float] = (1.0, 99.8),
                        seed: int = 0, val_input_dir: str | Path | None = None,
                        val_target_dir: str | Path | None = None, val_fraction: float = 0.2,
                        min_val_crops: int = 1, prefix: str = "",
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train and validation sets ``({"input", "target"}, {"input", "target"})`` from paired folders.

    Validation comes from ``val_input_dir``/``val_target_dir`` when given, else from a
    seed-deterministic ``val_fraction`` of the files (at least one file each side). Each validation
    image gives ``max(crops_per_image, ceil(min_val_crops / number of validation images))`` crops, so
    there are at least ``min_val_crops``. ``prefix`` (e.g. ``"data."``) is put before the setting names
    in error messages.
    """
    if (val_input_dir is None) != (val_target_dir is None):
        raise ValueError(f"{prefix}val_input_dir and {prefix}val_target_dir go together (give both or neither)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{prefix}val_fraction must be in (0, 1), got {val_fraction}")
    roles = {"input_role": f"{prefix}input_dir", "target_role": f"{prefix}target_dir"}
    pairs = pair_files(input_dir, target_dir, **roles)
    if val_input_dir is not None:
        train_pairs = pairs
        val_pairs = pair_files(val_input_dir, val_target_dir, input_role=f"{prefix}val_input_dir",
                               target_role=f"{prefix}val_target_dir")
    else:
        if len(pairs) < 2:
            raise ValueError(f"{prefix}input_dir: {str(input_dir)!r} has {len(pairs)} image pair; splitting off "
                             f"validation needs at least 2 (or give {prefix}val_input_dir/{prefix}val_target_dir)")
        order = np.random.default_rng(int(seed) & 0xFFFFFFFF).permutation(len(pairs))
        num_val = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
        val_pairs = [pairs[i] for i in sorted(order[:num_val])]
        train_pairs = [pairs[i] for i in sorted(order[num_val:])]
    options = dict(crop_size=crop_size, crops_per_image=crops_per_image, percentiles=percentiles,
                   crop_role=f"{prefix}crop_size")
    train = load_pairs(train_pairs, seed=seed, **options)
    options["crops_per_image"] = max(crops_per_image, math.ceil(min_val_crops / len(val_pairs)))
    val = load_pairs(val_pairs, seed=seed + 1, **options)
    return train, val
