"""Blur sensitivity of the objective: does a blurrier prediction score clearly lower than seed noise?

Per task (microstructure; microscopy on synthetic pairs; microscopy on paired folders of 16-bit TIFFs
made from scikit-image's bundled images) the same config is trained with 3 model seeds on fixed data
(``data.seed`` fixed, ``seed`` varies: weights initialisation and batch order). The spread of the
objective (the final epoch's ``composite``, on the task's default region) over the 3 seeds is the
noise a search has to see through; it is reported as max − min (the range) and as the sample std.

The best seed's validation predictions are then blurred by a Gaussian of σ = 0.5, 1, 2 px (per
channel, reflected borders) and scored again with the same masks and baseline MSEs. The drop of the
objective at each σ is printed beside the seed range. Goals: the drop at σ = 1 px is at least 3× the
seed range, and the composite and each of its parts (SSIM, MSE skill, gradient match, on the
objective's region) fall strictly as σ grows. The whole-frame composite is shown too.

    python -m benchmarks.blur_sensitivity [--quick] [--out results/bench]
    python -m benchmarks.blur_sensitivity --budget-scan   # the ratio at smaller and larger budgets (~10 min)
    python -m benchmarks.blur_sensitivity --augmentation  # folders with / without augmentation, 8 seeds (~9 min)

The seed noise depends on the training budget: the models of a tiny budget are far from converged and
differ from seed to seed as much as with 1 px of blur. ``--budget-scan`` trains microstructure with
12 / 16 / 24 sequences and the paired folders with 15 / 40 / 80 epochs, and once on folder data whose
input has no noise (the rest as above); it prints the drop at σ = 1 px, the seed range and their ratio for
each (``blur_sensitivity_budget.json``). The folder rows also show the task without its default
augmentation (``data.augment: none``: no random flips and turns of training batches) and on another draw
of the data (``data.seed: 1``: other validation images and crops).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common

NAME = "blur_sensitivity"
SIGMAS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)
GOAL_RATIO = 3.0  # drop at σ = 1 px over the seed range
SK_IMAGES = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "horse", "clock")


def configs(quick: bool, folder: Path) -> dict[str, dict[str, Any]]:
    """The benchmark's three trainings. Their budget sets the seed noise the drop is compared with; the
    README's budget scan shows the ratio for smaller and larger ones."""
    # the microscopy UNets train ~10× faster than the ConvLSTM here: more epochs
    epochs, micro_epochs, folder_epochs = (2, 2, 2) if quick else (15, 8, 40)
    common_train = {"device": "cpu", "amp": "off", "num_threads": 1, "lr": 2.0e-3, "batch_size": 8,
                    "epochs": epochs}
    # 24 sequences, a third for validation: 16 × 5 = 80 training and 8 × 5 = 40 validation windows
    micro_data = {"size": 32, "num_sequences": 24, "frames": 8, "seq_length": 3, "val_fraction": 0.34, "seed": 0}
    return {
        "microstructure": {**common_train, "task": "microstructure", "batch_size": 4, "epochs": micro_epochs,
                           "solidification_weighting": True, "data": micro_data,
                           "model": {"hidden_channels": [8, 16]}},
        "microscopy_synthetic": {**common_train, "task": "microscopy",
                                 "data": {"size": 32, "num_train": 48 if quick else 96, "num_val": 32, "seed": 0},
                                 "model": {"name": "unet", "base_channels": 8, "depth": 2}},
        # 8 training images × 24 crops per epoch; 2 held-out images give 48 validation crops
        "microscopy_folder": {**common_train, "task": "microscopy", "epochs": folder_epochs,
                              "data": {"input_dir": str(folder / "wf"), "target_dir": str(folder / "2p"),
                                       "crop_size": 32, "crops_per_image": 24, "seed": 0, "min_val_crops": 32},
                              "model": {"name": "unet", "base_channels": 8, "depth": 2}},
    }


def write_folder_data(folder: Path, *, input_blur: float = 2.0, input_noise: float = 0.03) -> list[str]:
    """16-bit TIFF pairs from scikit-image's bundled images: target = the image, input = a copy blurred by
    ``input_blur`` px, dimmer, with an offset and Gaussian noise of std ``input_noise`` (a widefield-like
    view). Returns the names written."""
    import tifffile
    from skimage import data as skdata
    from skimage.color import rgb2gray
    from skimage.filters import gaussian
    from skimage.transform import resize

    (folder / "wf").mkdir(parents=True, exist_ok=True)
    (folder / "2p").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for name in SK_IMAGES:
        try:
            img = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - an image that is not bundled (needs a download) is skipped
            continue
        img = rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype(np.float64)
        img = resize(img, (128, 128), anti_aliasing=True)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-9)
        wf = 0.6 * gaussian(img, input_blur) + 0.1 + input_noise * rng.standard_normal(img.shape)
        tifffile.imwrite(folder / "2p" / f"{name}.tif", (img * 60000).astype(np.uint16))
        tifffile.imwrite(folder / "wf" / f"{name}.tif", (np.clip(wf, 0, 1) * 60000).astype(np.uint16))
        names.append(name)
    return names


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N×C×H×W per channel, radius ⌈3σ⌉, reflected borders."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@torch.no_grad()
def validation_predictions(trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    trainer.model.eval()
    preds, targets, masks = [], [], []
    for batch in trainer.val_batches():
        preds.append(trainer.task.predict(trainer.model, batch).float())
        targets.append(trainer.task.target(batch).float())
        if trainer.task.eval_mask is not None:
            masks.append(trainer.task.eval_mask(batch))
    return torch.cat(preds), torch.cat(targets), torch.cat(masks) if masks else None


def score(trainer, pred, target, mask) -> dict[str, float]:
    from losstune.losses.metrics import evaluate_all, mse_skill
    values = evaluate_all(pred.clamp(0, 1), target, mse_ref=trainer.mse_ref, weights=trainer.config.composite_weights,
                          mask=mask, mse_ref_active=trainer.mse_ref_active, region=trainer.objective_region)
    suffix = "_active" if trainer.objective_region == "active" else ""
    ref = trainer.mse_ref_active if suffix else trainer.mse_ref
    return {"composite": values["composite"], "composite_full": values.get("composite_full", values["composite"]),
            "ssim": values[f"ssim{suffix}"], "mse_skill": mse_skill(values[f"mse{suffix}"], ref),
            "gradient_match": values[f"gradient_match{suffix}"], "sharpness_ratio": values[f"sharpness_ratio{suffix}"],
            "active_fraction": values.get("active_fraction", 1.0)}


PARTS = ("composite", "composite_full", "ssim", "mse_skill", "gradient_match", "sharpness_ratio")


def run_task(name: str, config: dict[str, Any]) -> dict[str, Any]:
    from losstune.trainables.loop import Trainer

    runs = []
    for seed in SEEDS:
        t0 = time.perf_counter()
        trainer = Trainer({**config, "seed": seed}, warn_small_val=False)
        result = trainer.fit()
        pred, target, mask = validation_predictions(trainer)
        runs.append({"seed": seed, "composite": result.metrics["composite"], "trainer": trainer,
                     "scores": score(trainer, pred, target, mask), "train_s": time.perf_counter() - t0})
        print(f"  {name} seed {seed}: composite {result.metrics['composite']:.4f} "
              f"({runs[-1]['train_s']:.0f} s, {trainer.task.num_val} val samples, region {trainer.objective_region})",
              flush=True)
    objectives = [r["composite"] for r in runs]
    spread_range = max(objectives) - min(objectives)
    spread_std = statistics.stdev(objectives)
    best = max(runs, key=lambda r: r["composite"])
    trainer = best["trainer"]
    pred, target, mask = validation_predictions(trainer)
    base = score(trainer, pred, target, mask)
    rows = []
    for sigma in SIGMAS:
        s = score(trainer, gaussian_blur(pred, sigma), target, mask)
        rows.append({"sigma": sigma, **s, "drop": base["composite"] - s["composite"],
                     "drop_full": base["composite_full"] - s["composite_full"]})
    chain = [base] + rows
    falling = {p: all(a[p] > b[p] for a, b in zip(chain, chain[1:]))
               for p in ("composite", "ssim", "mse_skill", "gradient_match")}
    drop1 = next(r["drop"] for r in rows if r["sigma"] == 1.0)
    # per part: its drop at σ = 1 px over its own range over the seeds (how well it separates blur from seed noise)
    at1 = next(r for r in rows if r["sigma"] == 1.0)
    parts = {}
    for part in PARTS:
        values = [r["scores"][part] for r in runs]
        rng = max(values) - min(values)
        drop = base[part] - at1[part]
        parts[part] = {"seed_values": values, "seed_range": rng, "drop_at_1px": drop,
                       "drop_over_range": drop / rng if rng > 0 else math.inf}
    return {"region": trainer.objective_region, "num_val": trainer.task.num_val, "seed_objectives": objectives,
            "spread_range": spread_range, "spread_std": spread_std, "best_seed": best["seed"], "unblurred": base,
            "blurred": rows, "drop_at_1px": drop1,
            "drop_over_range": drop1 / spread_range if spread_range > 0 else math.inf,
            "falls_strictly": falling, "parts": parts, "train_s": [r["train_s"] for r in runs]}


# (task, label, changes to its config): the budgets of --budget-scan; the benchmark's own are marked in the output
BUDGETS = (
    ("microstructure", "12 sequences, 8 epochs", {"data": {"num_sequences": 12}}),
    ("microstructure", "16 sequences, 8 epochs", {"data": {"num_sequences": 16}}),
    ("microstructure", "24 sequences, 8 epochs", {}),
    ("microstructure", "24 sequences, 16 epochs", {"epochs": 16}),
    ("microscopy_folder", "8 crops per image, 15 epochs", {"epochs": 15, "data": {"crops_per_image": 8}}),
    ("microscopy_folder", "24 crops per image, 40 epochs", {}),
    ("microscopy_folder", "24 crops per image, 80 epochs", {"epochs": 80}),
    ("microscopy_folder", "24 crops per image, 40 epochs, no augmentation", {"data": {"augment": "none"}}),
    ("microscopy_folder", "24 crops per image, 80 epochs, no augmentation", {"epochs": 80, "data": {"augment": "none"}}),
    ("microscopy_folder", "24 crops per image, 40 epochs, another draw of the data", {"data": {"seed": 1}}),
    ("microscopy_folder", "24 crops per image, 40 epochs, another draw, no augmentation",
     {"data": {"seed": 1, "augment": "none"}}),
    ("microscopy_folder", "24 crops per image, 40 epochs; input without noise, blurred by 1.5 px",
     {"input": {"input_blur": 1.5, "input_noise": 0.0}}),
)


def with_changes(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``changes`` applied (one level deep into ``data``; ``input`` is for the folder data)."""
    out = {**config, **{k: v for k, v in changes.items() if k not in ("data", "input")}}
    out["data"] = {**config["data"], **changes.get("data", {})}
    return out


def budget_scan(args, started: float) -> int:
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="losstune-blur-") as tmp:
        folder = Path(tmp)
        write_folder_data(folder)
        base = configs(False, folder)
        for i, (task, label, changes) in enumerate(BUDGETS):
            config = with_changes(base[task], changes)
            if "input" in changes:  # other folder data: the same images, another degradation of the input
                write_folder_data(folder / str(i), **changes["input"])
                config["data"] |= {"input_dir": str(folder / str(i) / "wf"), "target_dir": str(folder / str(i) / "2p")}
            r = run_task(f"{task} ({label})", config)
            results[f"{task}: {label}"] = r
            rising = [k for k, v in r["falls_strictly"].items() if not v]
            rows.append([task, label + ("" if changes else " (the benchmark's)"), r["num_val"], r["unblurred"]["composite"],
                         r["unblurred"]["mse_skill"], r["drop_at_1px"], r["spread_range"], r["drop_over_range"],
                         ", ".join(rising) or "none"])
    text = common.table(["task", "budget (and data)", "val samples", "composite (best seed)", "mse skill", "drop at σ=1",
                         "seed range", "drop ÷ range", "parts not falling"], rows)
    print(text)
    settings = {"sigmas": list(SIGMAS), "seeds": list(SEEDS), "budgets": [[t, label, c] for t, label, c in BUDGETS]}
    path = common.write_result(f"{NAME}_budget", args.out, quick=False, settings=settings, results=results, goals=[],
                               table_text=text, started=started, module=f"benchmarks.{NAME}")
    print(f"wrote {path}")
    return 0


AUGMENTATION_SEEDS = tuple(range(8))


def augmentation(args, started: float) -> int:
    """The folder config with and without its default augmentation, 8 model seeds each, on 2 draws of the
    data: mean and std of the final composite, and Welch's 95 % interval of the difference (scipy)."""
    from scipy import stats

    from losstune.trainables.loop import Trainer

    results: dict[str, Any] = {}
    rows = []
    seeds = AUGMENTATION_SEEDS[:2] if args.quick else AUGMENTATION_SEEDS
    with tempfile.TemporaryDirectory(prefix="losstune-blur-") as tmp:
        folder = Path(tmp)
        write_folder_data(folder)
        base = configs(args.quick, folder)["microscopy_folder"]
        for data_seed in (0, 1):
            finals = {}
            for augment in ("none", "dihedral"):
                finals[augment] = [
                    Trainer({**base, "seed": seed, "data": {**base["data"], "seed": data_seed, "augment": augment}},
                            warn_small_val=False).fit().metrics["composite"] for seed in seeds]
                print(f"  data.seed {data_seed}, augment {augment}: {[round(v, 4) for v in finals[augment]]}", flush=True)
            with_aug, without = np.array(finals["dihedral"]), np.array(finals["none"])
            test = stats.ttest_ind(with_aug, without, equal_var=False)
            interval = test.confidence_interval(0.95)
            results[f"data.seed {data_seed}"] = {**finals, "difference": float(with_aug.mean() - without.mean()),
                                                 "interval_95": [float(interval.low), float(interval.high)],
                                                 "p_value": float(test.pvalue)}
            for augment, values in (("none", without), ("dihedral", with_aug)):
                rows.append([data_seed, augment, len(values), values.mean(), values.std(ddof=1),
                             values.max() - values.min(), "" if augment == "none" else
                             f"{with_aug.mean() - without.mean():+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"])
    text = common.table(["data.seed", "augment", "model seeds", "mean composite", "std", "range",
                         "dihedral − none, 95 % (Welch)"], rows)
    print(text)
    settings = {"seeds": list(seeds), "config": configs(args.quick, Path("<tmp>"))["microscopy_folder"]}
    path = common.write_result(f"{NAME}_augmentation", args.out, quick=args.quick, settings=settings, results=results,
                               goals=[], table_text=text, started=started, module=f"benchmarks.{NAME}")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=[
        (("--budget-scan",), {"action": "store_true", "help": "the ratio at smaller and larger training budgets"}),
        (("--augmentation",), {"action": "store_true",
                               "help": "folder data with and without augmentation, 8 model seeds each (~9 min)"})])
    common.ensure_repo_on_path()
    common.set_single_thread()
    started = time.perf_counter()
    if args.budget_scan:
        return budget_scan(args, started)
    if args.augmentation:
        return augmentation(args, started)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="losstune-blur-") as tmp:
        folder = Path(tmp)
        results["folder_images"] = write_folder_data(folder)
        for name, config in configs(args.quick, folder).items():
            results[name] = run_task(name, config)
    task_names = [n for n in results if n != "folder_images"]
    headers = ["task", "region", "σ px", "composite", "drop", "drop (whole frame)", "ssim", "mse skill",
               "gradient match", "sharpness", "seed range / std", "drop@1 ÷ range"]
    rows = []
    for name in task_names:
        r = results[name]
        u = r["unblurred"]
        rows.append([name, r["region"], 0, u["composite"], 0.0, 0.0, u["ssim"], u["mse_skill"], u["gradient_match"],
                     u["sharpness_ratio"], f"{r['spread_range']:.4f} / {r['spread_std']:.4f}", r["drop_over_range"]])
        for b in r["blurred"]:
            rows.append(["", "", b["sigma"], b["composite"], b["drop"], b["drop_full"], b["ssim"], b["mse_skill"],
                         b["gradient_match"], b["sharpness_ratio"], "", ""])
    text = common.table(headers, rows)
    part_rows = [[name, part, v["drop_at_1px"], v["seed_range"], v["drop_over_range"]]
                 for name in task_names for part, v in results[name]["parts"].items()]
    text += "\n\nper part (best seed blurred by σ = 1 px; range over the 3 seeds, unblurred):\n" + common.table(
        ["task", "part", "drop at σ=1", "seed range", "drop ÷ range"], part_rows)
    print(text)
    goals = []
    for name in task_names:
        r = results[name]
        goals.append(common.goal(f"{name}: seed range ÷ drop at σ=1 px (≤ 1/3 ⇔ drop ≥ 3× range)",
                                 r["spread_range"] / r["drop_at_1px"] if r["drop_at_1px"] > 0 else math.inf,
                                 1 / GOAL_RATIO))
        rising = [k for k, v in r["falls_strictly"].items() if not v]
        goals.append(common.goal(f"{name}: composite and parts that do not fall strictly with σ (count)",
                                 float(len(rising)), 0.0, note=", ".join(rising)))
    common.print_goals(goals)
    settings = {"sigmas": list(SIGMAS), "seeds": list(SEEDS),
                "configs": {k: v for k, v in configs(args.quick, Path("<tmp>")).items()},
                "spread": "range = max − min over the seeds (also std, n−1)"}
    path = common.write_result(NAME, args.out, quick=args.quick, settings=settings, results=results, goals=goals,
                               table_text=text, started=started)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
