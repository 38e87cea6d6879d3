"""GPU path: AMP on/off, and aggregate throughput with 1, 2 and 4 trials packed on one GPU.

Runs only where CUDA is present; elsewhere it prints "skipped: no CUDA" and writes a JSON saying so.

* AMP: ``trainables.loop.Trainer`` on the microstructure task (64 px, ConvLSTM [16, 32, 64]; ``--model
  unet`` / ``ddpm``: the microscopy task's UNet regressor / conditional DDPM, see :func:`train_config`) on
  ``cuda`` with ``amp: off`` (fp32), ``bf16`` (when supported) and ``fp16`` (loss scaling); median
  epoch time after a warm-up epoch, train samples/s, and the ratio to fp32.
* packing: a real losstune sweep (``search.runner.run_sweep``, FIFO, MLflow off) with ``resources.gpu``
  = 1/k and ``max_concurrent`` = k for k = 1, 2, 4 (2·k trials each, so every slot runs two); aggregate
  train samples/s = (samples trained by all trials) ÷ (Tune's wall time), and from the epoch times
  (k × samples per epoch ÷ median epoch time).
* ``--packing processes`` (no Ray needed): what the GPU does when k trials share it, without the sweep
  around them. k processes (as Ray starts k trial workers for ``resources.gpu: 1/k``) each build the
  same ``Trainer``, train one warm-up epoch, wait for each other, then train the timed epochs side by
  side; aggregate samples/s = (samples trained by all) ÷ (last end − common start), per precision
  (``amp: off`` and ``auto``). Set-up, process start and Tune's scheduling are not in it: it is the
  upper bound of what packing can give a sweep.

``--cpu-dry-run`` runs the same code on the CPU at a tiny size (``gpu: 0``) to check it works; its
numbers mean nothing. ``--no-packing`` measures AMP alone (no Ray needed).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from benchmarks import common

NAME = "gpu_path"


MODELS = ("convlstm", "unet", "ddpm")


def train_config(device: str, amp: str, quick: bool, dry: bool, large: bool = False,
                 model: str = "convlstm", sets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model the benchmark trains, tiny for ``quick`` / ``dry``:

    * ``convlstm``: the microstructure ConvLSTM, 64 px, [16, 32, 64] channels; ``large``: 128 px, [32, 64, 128]
      (~16x the arithmetic per sample);
    * ``unet`` / ``ddpm``: the microscopy task as configs/microscopy.yaml trains it (64 px, 128 training pairs,
      base 16 channels, depth 2; the DDPM samples 10 DDIM steps at evaluation); ``large``: 128 px, base 32,
      depth 3.

    ``sets``: dotted train-config keys -> values applied last (``--set data.size=256``).
    """
    small = quick or dry
    common_keys = {"seed": 0, "epochs": 50, "batch_size": 8, "lr": 1.0e-3, "device": device, "amp": amp,
                   "preload": True, "gradient_weight": 0.1, "perceptual_weight": 0.05}
    if model == "convlstm":
        size, channels = (128, [32, 64, 128]) if large else (64, [16, 32, 64])
        config = {"task": "microstructure", **common_keys, "solidification_weighting": True,
                  "data": ({"size": 16, "num_sequences": 4, "frames": 6, "seq_length": 2} if small
                           else {"size": size, "num_sequences": 16, "frames": 12, "seq_length": 4}),
                  "model": {"hidden_channels": [4, 8] if small else channels}}
    elif model not in MODELS:
        raise ValueError(f"model: {model!r} is not one of {', '.join(MODELS)}")
    else:
        size, base, depth = (128, 32, 3) if large else (64, 16, 2)
        config = {"task": "microscopy", **common_keys, "pixel_loss": "l1",
                  "data": {"size": 16, "num_train": 8, "num_val": 4} if small
                  else {"size": size, "num_train": 128, "num_val": 32},
                  "model": {"name": model, "base_channels": 4 if small else base, "depth": 1 if small else depth,
                            **({"timesteps": 20, "sampling_steps": 2} if model == "ddpm" and small else {})}}
    for key, value in (sets or {}).items():  # search.space.set_path's job; not imported: see _parse_sets
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``["data.size=256"]`` -> ``{"data.size": 256}``; values are Python literals, else strings. (Not
    search.config's YAML parser: the GPU machines this runs on may lack the sweep's dependencies.)"""
    import ast
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. data.size=256")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()
    return out


def _warm_trainer(config: dict[str, Any]):
    """A ``Trainer`` of ``config`` that has trained one epoch, untimed (CUDA context, cuDNN autotuning, allocator)."""
    from losstune.trainables.loop import Trainer
    trainer = Trainer(config)
    trainer.run_epoch()
    return trainer


def measure_amp(device: str, quick: bool, dry: bool, large: bool = False, model: str = "convlstm",
                sets: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    import torch

    modes = ["off", "bf16", "fp16"]
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        modes.remove("bf16")
    epochs = 2 if (quick or dry) else 6
    out = []
    for amp in modes:
        trainer = _warm_trainer(train_config(device, amp, quick, dry, large, model, sets))
        reports = [trainer.run_epoch() for _ in range(epochs)]
        if any(r.status == "diverged" for r in reports):  # a diverged epoch has no timings
            raise SystemExit(f"amp={amp}: the training diverged; try a lower learning rate (--set lr=1e-4)")
        metrics = [r.metrics for r in reports]
        evals = [m["eval_time_s"] for m in metrics]
        train_s = common.median([m["epoch_time_s"] - m["eval_time_s"] for m in metrics])
        out.append({"amp": amp, "dtype": str(trainer.amp_dtype), "train_s_per_epoch": train_s,
                    "eval_s_per_epoch": common.median(evals), "samples_per_s": trainer.task.num_train / train_s,
                    "composite": trainer.history[-1].get("composite")})
        del trainer
        if device == "cuda":
            torch.cuda.empty_cache()
    base = out[0]["train_s_per_epoch"]
    for r in out:
        r["speedup_vs_fp32"] = base / r["train_s_per_epoch"]
    return out


def measure_packing(device: str, quick: bool, dry: bool, tmp: Path, large: bool = False,
                    model: str = "convlstm", sets: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    import ray

    from losstune.search.config import validate_sweep
    from losstune.search.runner import run_sweep
    from losstune.search.trials import load_results
    from losstune.trainables.config import parse_train_config
    from losstune.trainables.registry import get_task_factory

    out = []
    for k in (1, 2) if (quick or dry) else (1, 2, 4):
        train = train_config(device, "auto", quick, dry, large, model, sets)
        train["epochs"] = 2 if (quick or dry) else 4
        raw = {"name": f"pack{k}", "train": train,
               "space": {"gradient_weight": {"type": "uniform", "low": 0.0, "high": 0.3}},
               "search": {"sampler": "random", "seed": 0, "num_samples": 2 * k, "max_concurrent": k},
               "scheduler": {"type": "fifo"}, "objective": {"type": "composite"},
               "resources": {"cpu": 1, "gpu": 0 if device == "cpu" else 1.0 / k},
               "mlflow": {"enabled": False}, "results_dir": str(tmp)}
        sweep = validate_sweep(raw, source=f"<gpu_path k={k}>", overrides={"results_dir": str(tmp)})
        log = io.StringIO()
        ray.init(num_cpus=max(k, 2), include_dashboard=False, logging_level="WARNING")
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(log):
                outcome = run_sweep(sweep, out=lambda s: log.write(s + "\n"))
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        results = load_results(outcome.sweep_dir)
        rows = [r for h in results.histories.values() for r in h]
        epoch_times = [float(r.get("epoch_time_s", 0)) - float(r.get("eval_time_s", 0)) for r in rows]
        n_train = get_task_factory(train["task"])(parse_train_config(train)).num_train  # same for every trial
        samples = n_train * len(rows)
        med = common.median(epoch_times)
        out.append({"trials_per_gpu": k, "trials": len(results.histories), "epochs_total": len(rows),
                    "status": outcome.status, "wall_s": wall, "samples_per_s_wall": samples / wall,
                    "median_train_s_per_epoch": med, "samples_per_s_epochs": k * n_train / med})
    base_w, base_e = out[0]["samples_per_s_wall"], out[0]["samples_per_s_epochs"]
    for r in out:
        r["gain_wall"] = r["samples_per_s_wall"] / base_w
        r["gain_epochs"] = r["samples_per_s_epochs"] / base_e
    return out


def _packed_trainer(config: dict[str, Any], epochs: int, barrier, results) -> None:
    """One of the k processes of :func:`measure_packing_processes` (module-level: spawned processes import it)."""
    try:
        trainer = _warm_trainer(config)
        barrier.wait(timeout=600)
        start = time.monotonic()
        times = [trainer.run_epoch().metrics["epoch_time_s"] for _ in range(epochs)]
        results.put({"start": start, "end": time.monotonic(), "epoch_s": times, "num_train": trainer.task.num_train,
                     "dtype": str(trainer.amp_dtype)})
    except BaseException as err:  # noqa: BLE001 - the parent reports it; the others must not wait for this one
        barrier.abort()
        results.put({"error": f"{type(err).__name__}: {err}"})


def measure_packing_processes(device: str, quick: bool, dry: bool, ks: tuple[int, ...] | None = None,
                              amps: tuple[str, ...] = ("off", "auto"), large: bool = False,
                              model: str = "convlstm", sets: Mapping[str, Any] | None = None
                              ) -> list[dict[str, Any]]:
    """k = 1, 2, 4 training processes on one device at once, per precision (see the module docstring); the
    gains are over k = 1 of the same precision (nan where ``ks`` lacks 1)."""
    import math
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    epochs = 2 if (quick or dry) else 10
    ks = ks or ((1, 2) if (quick or dry) else (1, 2, 4))
    out = []
    for amp in amps:
        for k in ks:
            config = {**train_config(device, amp, quick, dry, large, model, sets), "num_threads": 1 if dry else 2}
            barrier, results = ctx.Barrier(k), ctx.Queue()
            procs = [ctx.Process(target=_packed_trainer, args=(config, epochs, barrier, results)) for _ in range(k)]
            for p in procs:
                p.start()
            got = [results.get(timeout=900) for _ in procs]
            for p in procs:
                p.join(60)
            errors = [g["error"] for g in got if "error" in g]
            if errors:
                raise RuntimeError(f"packing k={k} amp={amp}: {errors[0]}")
            wall = max(g["end"] for g in got) - min(g["start"] for g in got)
            samples = sum(g["num_train"] * len(g["epoch_s"]) for g in got)
            med = common.median([t for g in got for t in g["epoch_s"]])
            out.append({"amp": amp, "dtype": got[0]["dtype"], "processes": k, "epochs": epochs, "wall_s": wall,
                        "samples_per_s_wall": samples / wall, "median_epoch_s": med,
                        "samples_per_s_epochs": k * got[0]["num_train"] / med})
            # each row as it comes: a run cut short by a time limit still shows what it measured
            print(f"packing amp={amp} processes={k}: {samples / wall:.1f} samples/s over {wall:.2f} s", flush=True)
    for r in out:
        base = next((b for b in out if b["amp"] == r["amp"] and b["processes"] == 1), None)
        r["gain_wall"] = r["samples_per_s_wall"] / base["samples_per_s_wall"] if base else math.nan
        r["gain_epochs"] = r["samples_per_s_epochs"] / base["samples_per_s_epochs"] if base else math.nan
    return out


def main(argv=None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=[
        (("--cpu-dry-run",), {"action": "store_true", "help": "run the code on the CPU (tiny; checks it works)"}),
        (("--no-packing",), {"action": "store_true", "help": "AMP only: no sweeps (e.g. where Ray is not installed)"}),
        (("--packing",), {"choices": ["sweep", "processes"], "default": "sweep",
                          "help": "sweep: real losstune sweeps on Ray (default); processes: k trainers side by "
                                  "side without Ray"}),
        (("--model",), {"choices": MODELS, "default": "convlstm",
                        "help": "convlstm: the microstructure task's (default); unet / ddpm: the microscopy task's"}),
        (("--large",), {"action": "store_true", "help": "a larger model (convlstm: 128 px, [32, 64, 128] channels; "
                                                       "unet / ddpm: 128 px, base 32, depth 3)"}),
        (("--set",), {"action": "append", "default": [], "metavar": "KEY=VALUE",
                      "help": "a train-config key of the model, e.g. --set data.size=256 --set batch_size=16"})])
    started = time.perf_counter()
    common.ensure_repo_on_path()
    import torch

    sets = _parse_sets(args.set)

    os.environ.setdefault("LOSSTUNE_PROGRESS_INTERVAL", "0")
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("\nGPU path: skipped: no CUDA")
        path = common.write_result(NAME, args.out, quick=args.quick, settings={}, started=started,
                                   results={"skipped": True, "reason": "no CUDA"}, goals=[],
                                   table_text="skipped: no CUDA")
        print(f"wrote {path}")
        return {"skipped": True}
    device = "cuda" if torch.cuda.is_available() and not args.cpu_dry_run else "cpu"
    if device == "cpu":
        common.set_single_thread()
    amp = measure_amp(device, args.quick, args.cpu_dry_run, args.large, args.model, sets)
    t1 = common.table(["amp", "autocast dtype", "train s/epoch", "samples/s", "speed-up vs fp32", "eval s/epoch"],
                      [[r["amp"], r["dtype"], r["train_s_per_epoch"], r["samples_per_s"], r["speedup_vs_fp32"],
                        r["eval_s_per_epoch"]] for r in amp])
    if args.no_packing:
        packing, t2 = [], "packing: not measured (--no-packing)"
    elif args.packing == "processes":
        packing = measure_packing_processes(device, args.quick, args.cpu_dry_run, large=args.large,
                                            model=args.model, sets=sets)
        t2 = common.table(["amp", "autocast dtype", "processes on one GPU", "wall s", "samples/s (wall)", "gain",
                           "median epoch s", "samples/s (epochs)", "gain"],
                          [[r["amp"], r["dtype"], r["processes"], r["wall_s"], r["samples_per_s_wall"],
                            r["gain_wall"], r["median_epoch_s"], r["samples_per_s_epochs"], r["gain_epochs"]]
                           for r in packing])
    else:
        with tempfile.TemporaryDirectory(prefix="losstune-bench-gpu-") as tmpdir:
            packing = measure_packing(device, args.quick, args.cpu_dry_run, Path(tmpdir), args.large, args.model, sets)
        t2 = common.table(["trials per GPU", "trials", "sweep wall s", "samples/s (wall)", "gain",
                           "samples/s (epochs)", "gain"],
                          [[r["trials_per_gpu"], r["trials"], r["wall_s"], r["samples_per_s_wall"], r["gain_wall"],
                            r["samples_per_s_epochs"], r["gain_epochs"]] for r in packing])
    print(f"\nGPU path on {device}{' (CPU DRY RUN: numbers mean nothing)' if device == 'cpu' else ''}"
          f"{' (QUICK)' if args.quick else ''}")
    print(t1)
    print(t2)
    settings = {"device": device, "dry_run": args.cpu_dry_run, "model": args.model, "large": args.large,
                "sets": sets}
    path = common.write_result(NAME, args.out, quick=args.quick, settings=settings,
                               results={"skipped": False, "device": device, "amp": amp, "packing": packing,
                                        "packing_mode": None if args.no_packing else args.packing},
                               goals=[], table_text=t1 + "\n" + t2, started=started)
    print(f"wrote {path}")
    return {"amp": amp, "packing": packing}


if __name__ == "__main__":
    main()
