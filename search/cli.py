"""``losstune`` command line: sweep, export, train, trials, report, verify.

Exit codes: 0 ok, 2 bad input (config, paths, unreachable tracking server; nothing was started),
1 runtime failure (the sweep/training ran and failed, or nothing could be exported), 130 interrupted
(Ctrl-C; ``--resume`` continues a sweep or a training).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_RUNTIME, EXIT_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C, in every command and at every stage (128 + SIGINT, as shells report it)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("losstune")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="losstune",
        description="Tune the loss weights of image-to-image models with Optuna on Ray Tune, tracked in MLflow.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad input, 130 interrupted (Ctrl-C).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sweep", help="run a sweep from a sweep YAML",
                       description="Run a sweep: Optuna suggests loss weights, Ray Tune trains the trials "
                                   "(ASHA stops bad ones early), MLflow logs everything; the best config is "
                                   "exported to <results>/<name>/best.yaml.")
    p.add_argument("config", metavar="CONFIG",
                   help="sweep YAML (see configs/microstructure.yaml for the documented shape); with --resume "
                        "also a sweep's results folder (results/<name>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="set any config field: dotted key, YAML value (train.epochs=3 search.num_samples=16 "
                        "resources.gpu=0.5 'space.lr={type: loguniform, low: 1e-4, high: 1e-2}'); "
                        "validated like the file, recorded in the sweep's sweep.json and MLflow parent run")
    p.add_argument("--name", help="sweep name (results/<name>/, MLflow parent run); default: the config's, "
                                  "made unique (NAME-2, NAME-3 ...) when results/<name> exists; a --name "
                                  "that exists is refused")
    p.add_argument("--num-samples", type=int, help="number of trials (overrides search.num_samples)")
    p.add_argument("--address", help="Ray cluster address (overrides ray.address and $RAY_ADDRESS)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: losstune sweep --resume results/<name> "
                        "(or CONFIG [--name NAME] --resume)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything and print the resolved config, search space, planned trials, "
                        "resources and tracking target; starts nothing, writes nothing")
    p.add_argument("--results-dir", help="results root (overrides results_dir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (precedence: this flag > mlflow.tracking_uri > "
                                          "$MLFLOW_TRACKING_URI > sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (precedence: this flag > mlflow.experiment > "
                                        "$MLFLOW_EXPERIMENT_NAME > losstune)")

    p = sub.add_parser("export", help="write the best trial(s) of a sweep as training YAML(s)")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="the sweep's folder (results/<name>)")
    p.add_argument("--out", help="output file (default RESULTS_DIR/best.yaml); ranks 2.. go beside it")
    p.add_argument("--top-k", type=int, default=1, help="also write the next best: best_2.yaml ... (default 1)")

    p = sub.add_parser("train", help="train a final model from an exported (or hand-written) training YAML")
    p.add_argument("config", help="training YAML (a TrainConfig + optional provenance block)")
    p.add_argument("--epochs", type=int, help="override epochs")
    p.add_argument("--device", help="override device (auto, cpu, cuda, cuda:N, mps)")
    p.add_argument("--out", help="output folder (default: <sweep folder>/final or results/<name>/final)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment",
                   help="MLflow experiment (default: the sweep's, else $MLFLOW_EXPERIMENT_NAME, else losstune)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training in --out from its last saved epoch (same config)")

    p = sub.add_parser("report", help="write an HTML report of a sweep (figures, leaderboard) and log it to MLflow")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="the sweep's folder (results/<name>)")
    p.add_argument("--out", help="output folder (default RESULTS_DIR/report)")
    p.add_argument("--top-k", type=int, default=10, help="trials in the leaderboard (default 10)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the sweep's MLflow run")

    p = sub.add_parser("verify", help="re-train the top configs and their matched baselines on fresh seeds",
                       description="Verify a sweep's winners: the top-k configs and their matched baselines "
                                   "(every shaping loss weight 0, same lr / warm-up / model / epochs) train on N "
                                   "fresh seeds; means, 95 % intervals and paired differences go to "
                                   "RESULTS_DIR/verify/ with a verdict, best.yaml becomes the best verified "
                                   "config. Re-runnable: finished runs are reused (more seeds, more configs, "
                                   "after a Ctrl-C).")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="the sweep's folder (results/<name>)")
    p.add_argument("--top-k", type=int, help="configs to verify (default: the sweep's verify.top_k, else 2)")
    p.add_argument("--seeds", type=int, help="fresh seeds per config, at least 2 (default: verify.seeds, else 3)")
    p.add_argument("--address", help="Ray cluster address (default: the sweep's, else a local Ray)")

    p = sub.add_parser("trials", help="show a sweep's trials as a table")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="the sweep's folder (results/<name>)")
    p.add_argument("--sort", help="sort by this column (default composite, best first)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (a list of trials, one object each, on stdout)")

    p = sub.add_parser("ls", help="list the sweeps in a results folder: status, trials, best, verified")
    p.add_argument("results_root", metavar="RESULTS_ROOT", nargs="?", default="results",
                   help="the folder holding sweep folders (default: results)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    return parser


def _err(msg: str) -> None:
    print(f"losstune: error: {msg}", file=sys.stderr, flush=True)


def cmd_sweep(args) -> int:
    from losstune.search.config import SweepConfigError, load_sweep, parse_overrides
    from losstune.search.dry_run import describe_plan
    from losstune.search.runner import RESUME_WITH_OVERRIDES, SweepInputError, SweepRuntimeError, run_sweep
    from losstune.search.trials import SWEEP_CONFIG, SWEEP_FILE
    if args.num_samples is not None and args.num_samples < 1:
        _err("--num-samples: must be >= 1")
        return EXIT_INPUT
    overrides = {"name": args.name, "num_samples": args.num_samples, "address": args.address,
                 "results_dir": args.results_dir, "tracking_uri": args.tracking_uri, "experiment": args.experiment}
    config = Path(args.config)
    try:
        sets = parse_overrides(args.overrides)
        if args.resume and sets:
            raise SweepConfigError(RESUME_WITH_OVERRIDES)  # before the saved config is read with them
        if args.resume and config.is_dir():  # losstune sweep --resume results/NAME
            if not (config / SWEEP_FILE).is_file():
                raise SweepConfigError(f"{config}: not a sweep's results folder (no {SWEEP_FILE}); nothing to resume")
            if args.name or args.results_dir:
                raise SweepConfigError("--resume RESULTS_FOLDER names the sweep itself; drop --name / --results-dir")
            overrides.update(name=config.resolve().name, results_dir=str(config.resolve().parent))
            config = config / SWEEP_CONFIG
        elif config.is_dir() and (config / SWEEP_FILE).is_file():
            raise SweepConfigError(f"{config}: not a file but a sweep's results folder; to continue that sweep: "
                                   f"losstune sweep --resume {config}")
        # on --resume the saved config is authoritative: check the given one only shallowly
        sweep = load_sweep(config, overrides, deep=not args.resume, sets=sets)
    except SweepConfigError as err:
        _err(str(err))
        return EXIT_INPUT
    try:
        if args.dry_run:
            print(describe_plan(sweep, resume=args.resume, address=args.address, new_name_if_taken=not args.name))
            return EXIT_OK
        outcome = run_sweep(sweep, resume=args.resume, address=args.address, new_name_if_taken=not args.name)
    except SweepInputError as err:
        _err(str(err))
        return EXIT_INPUT
    except SweepRuntimeError as err:
        _err(str(err))
        return EXIT_RUNTIME
    verification = getattr(outcome.verification, "status", None)
    if outcome.status == "interrupted" or verification == "interrupted":
        return EXIT_INTERRUPTED  # the printed losstune sweep --resume / losstune verify command continues it
    if outcome.status == "finished":
        return EXIT_OK if verification in (None, "verified") else EXIT_RUNTIME
    _err(f"no trial succeeded; see {outcome.sweep_dir}/trials.csv and the trials' error.txt")
    return EXIT_RUNTIME


def cmd_export(args) -> int:
    from losstune.search.export import ExportError, export
    from losstune.search.trials import ResultsError
    try:
        paths = export(args.results_dir, out=args.out, top_k=args.top_k)
    except (ResultsError, ValueError) as err:
        _err(str(err))
        return EXIT_INPUT
    except ExportError as err:
        _err(str(err))
        return EXIT_RUNTIME
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_train(args) -> int:
    from losstune.search.final import FinalInputError, FinalInterrupted, run_final
    if not Path(args.config).is_file():
        _err(f"{args.config}: no such file")
        return EXIT_INPUT
    try:
        outcome = run_final(args.config, epochs=args.epochs, device=args.device, out=args.out,
                            tracking_uri=args.tracking_uri, experiment=args.experiment,
                            progress=not args.no_progress, resume=args.resume)
    except FinalInputError as err:
        _err(str(err))
        return EXIT_INPUT
    except FinalInterrupted as stop:
        again = ["losstune", "train", args.config, "--out", str(stop.out_dir)]
        for flag, value in (("--epochs", args.epochs), ("--device", args.device),
                            ("--tracking-uri", args.tracking_uri), ("--experiment", args.experiment)):
            if value is not None:
                again += [flag, str(value)]
        print(f"[losstune] interrupted after epoch {stop.epoch}/{stop.epochs}; the state is saved in {stop.out_dir}")
        print(f"[losstune] continue it with: {shlex.join(again)} --resume")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - a runtime failure of the training itself
        _err(f"training failed: {type(err).__name__}: {err}")
        return EXIT_RUNTIME
    metrics = " ".join(f"{k} {outcome.metrics[k]:.4g}" for k in ("composite", "ssim", "mse", "psnr")
                       if isinstance(outcome.metrics.get(k), float))
    print(f"[losstune] {outcome.status}: {metrics}")
    print(f"[losstune] model:  {outcome.model_path}")
    print(f"[losstune] config: {outcome.config_path}")
    if outcome.run_id:
        print(f"[losstune] MLflow run: {outcome.run_id}")
    return EXIT_OK if outcome.status != "diverged" else EXIT_RUNTIME


def cmd_trials(args) -> int:
    from losstune.search.trials import ResultsError, format_table, load_results, sort_table
    try:
        results = load_results(args.results_dir)
        table = sort_table(results.table, args.sort)
    except ResultsError as err:
        _err(str(err))
        return EXIT_INPUT
    if args.format == "json":
        print(table.drop(columns=["path"], errors="ignore").to_json(orient="records", indent=1))
    elif table.empty:
        print("(no trials yet)")
    else:
        print(format_table(table))
    if args.csv:
        try:
            table.drop(columns=["path"]).to_csv(args.csv, index=False)
        except OSError as err:
            _err(f"--csv: {err}")
            return EXIT_INPUT
    return EXIT_OK


def cmd_report(args) -> int:
    from losstune.search.report import ReportError, build_report
    from losstune.search.trials import ResultsError
    try:
        outcome = build_report(args.results_dir, args.out, top_k=args.top_k, log_mlflow=not args.no_mlflow)
    except (ResultsError, ValueError) as err:
        _err(str(err))
        return EXIT_INPUT
    except ReportError as err:
        _err(str(err))
        return EXIT_RUNTIME
    print(f"[losstune] report: {outcome.html}")
    return EXIT_OK


def cmd_ls(args) -> int:
    import json

    from losstune.search.listing import format_listing, list_sweeps
    root = Path(args.results_root)
    if not root.is_dir():
        _err(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
        return EXIT_INPUT
    sweeps = list_sweeps(root)
    if args.format == "json":
        print(json.dumps(sweeps, indent=1))
    elif not sweeps:
        print(f"(no sweeps in {root})")
    else:
        print(format_listing(sweeps))
    return EXIT_OK


def cmd_verify(args) -> int:
    from losstune.search.trials import ResultsError
    from losstune.search.verify import verify_sweep
    from losstune.search.verify_plan import VerifyInputError
    try:
        outcome = verify_sweep(args.results_dir, args.top_k, args.seeds, address=args.address)
    except (ResultsError, VerifyInputError) as err:
        _err(str(err))
        return EXIT_INPUT
    return {"verified": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(outcome.status, EXIT_RUNTIME)


COMMANDS = {"sweep": cmd_sweep, "export": cmd_export, "train": cmd_train, "trials": cmd_trials,
            "report": cmd_report, "verify": cmd_verify, "ls": cmd_ls}


def _setup_logging() -> None:
    import logging
    log = logging.getLogger("losstune")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[losstune] %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    try:
        # KEY=VALUE overrides may come after options too (sweep CONFIG --name x train.epochs=3)
        args, extra = parser.parse_known_args(argv)
        if extra:
            if args.command != "sweep" or any(e.startswith("-") for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
    except SystemExit as exc:  # --help / --version exit 0, usage errors exit 2
        code = exc.code
        return code if isinstance(code, int) else EXIT_INPUT
    if not args.command:
        parser.print_help()
        return EXIT_INPUT
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
