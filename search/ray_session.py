"""The driver's Ray: which cluster to join (or a local Ray to start), checked before ``ray.init`` waits on it,
and the few Ray, Tune and interpreter settings and log notices losstune changes while a sweep or a verification
runs.

:class:`RaySession` is what a command holds while it uses Ray: Ray joined or started, and, for a local
Ray it started, the watchdog (:mod:`search.watchdog`) that stops Ray's processes if the driver is killed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from losstune.search.internals import RAY_AUTH_PROBE, RAY_AUTH_REFUSED, RAY_TOKEN_AUTH_LOGGER, ray_session_root
from losstune.search.watchdog import start_watchdog, stop_watchdog

if TYPE_CHECKING:
    from losstune.search.config import Sweep

logger = logging.getLogger("losstune")

RAY_TOKEN_HINT = ("set RAY_AUTH_MODE=token and the cluster's token: RAY_AUTH_TOKEN=<`ray get-auth-token` on the "
                  "head> (or RAY_AUTH_TOKEN_PATH=<a file holding it>)")


class RayTokenRefused(RuntimeError):
    """The Ray cluster uses token authentication and refused this driver (no token, or not its token)."""


def quiet_ray() -> None:
    """losstune prints its own progress: Tune's tables and checkpoint-snapshot warnings off (env overrides)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nobody listens on: ray.init would wait minutes."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ConnectionError(f"nothing answers at {address} ({err})") from None


def check_ray_token(address: str, timeout: float = 30.0) -> None:
    """A cluster with token authentication refuses a driver without its token, and ``ray.init`` then prints a
    screen of warnings: find out first, with the same environment ray.init would use, and say what to set.

    Raises :class:`RayTokenRefused` with a one-line message; any other outcome is left to ``ray.init``.
    """
    if "://" in address or address == "auto":
        return  # the Ray client (ray://) authenticates differently; "auto" is a local cluster
    try:
        proc = subprocess.run([sys.executable, "-c", RAY_AUTH_PROBE, address], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return
    if proc.returncode == RAY_AUTH_REFUSED:
        given = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        why = "refused this driver's token" if given else "uses token authentication"
        raise RayTokenRefused(f"the cluster at {address} {why}: {RAY_TOKEN_HINT}")


# A Ray log notice: (logger name, is-the-notice(message)).
RayNotice = tuple[str, Callable[[str], bool]]


@contextlib.contextmanager
def without_ray_notices(*notices: RayNotice) -> Iterator[None]:
    """Drop the given notices from Ray's log while the block runs; every other message still shows."""
    filters = []
    for logger_name, is_notice in notices:
        def keep(record: logging.LogRecord, is_notice=is_notice) -> bool:
            return not is_notice(record.getMessage())
        logging.getLogger(logger_name).addFilter(keep)
        filters.append((logger_name, keep))
    try:
        yield
    finally:
        for logger_name, keep in filters:
            logging.getLogger(logger_name).removeFilter(keep)


def _only_trials_without_results(message: str) -> bool:
    lines = message.splitlines()
    return lines[0].startswith("Failed to fetch metrics") and all("were not found at" in x for x in lines[1:])


# Ray 2.60 turns token authentication on for every new local cluster (good: README, Security) and says so
# with a WARNING on every sweep, which reads like something went wrong; "token authentication is disabled"
# (RAY_AUTH_MODE=disabled) still shows
TOKEN_AUTH_NOTICE: RayNotice = (RAY_TOKEN_AUTH_LOGGER, lambda m: m.startswith("Token authentication is enabled"))
# after Ctrl-C Tune says to resume with Tuner.restore(...); losstune prints its own --resume command instead
TUNE_RESTORE_HINT: RayNotice = ("ray.tune.tune", lambda m: m.startswith("Experiment has been interrupted"))
# a Ctrl-C before a trial's first result: Tune warns it has no results (losstune's summary says so); other
# failures to read a trial's results (a damaged file) still show
NO_RESULTS_YET: RayNotice = ("ray.tune.analysis.experiment_analysis", _only_trials_without_results)


def ray_address(sweep: Sweep, address: str | None = None) -> str | None:
    """The cluster to connect to (``--address`` > ray.address > $RAY_ADDRESS); None: start a local Ray."""
    address = address or sweep.file.ray.address or os.environ.get("RAY_ADDRESS") or None
    return address if address and address != "local" else None


def init_ray(sweep: Sweep, address: str | None = None) -> bool:
    """Connect to (``address`` / config / $RAY_ADDRESS) or start a local Ray; True if we started it."""
    import ray
    remote = ray_address(sweep, address)
    if remote:
        probe_address(remote)  # a dead address is an input error, whatever runs in this process
    if remote and not ray.is_initialized():
        check_ray_token(remote)
    if ray.is_initialized():  # API use inside a process that already runs Ray: use that one
        if remote:
            logger.warning("Ray is already initialised in this process; address %s is not used", remote)
        return False
    if remote:
        ray.init(address=remote, logging_level=logging.WARNING, log_to_driver=True)
    else:
        with without_ray_notices(TOKEN_AUTH_NOTICE):
            ray.init(num_cpus=sweep.file.ray.num_cpus, num_gpus=sweep.file.ray.num_gpus, include_dashboard=False,
                     logging_level=logging.WARNING)
    return True


class RaySession:
    """Ray as one command uses it: :meth:`open` joins or starts it, closing (``with``) shuts down what
    :meth:`open` started, and a Ray that was already running in this process stays as it was."""

    def __init__(self, started: bool, watchdog: subprocess.Popen | None = None):
        self.started = started
        self.watchdog = watchdog

    @classmethod
    def open(cls, sweep: Sweep, address: str | None = None) -> RaySession:
        """Ray for ``sweep`` (see :func:`init_ray`), quiet (:func:`quiet_ray`); the errors of :func:`init_ray`."""
        quiet_ray()
        started = init_ray(sweep, address)
        return cls(started, start_watchdog() if started else None)

    def close(self) -> None:
        if self.started:
            import ray
            ray.shutdown()
        if self.watchdog is not None:
            stop_watchdog(self.watchdog)

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def no_tensorboard_logger() -> Iterator[None]:
    """Tune adds CSV, JSON and TensorBoard loggers unless told not to; losstune passes the two it reads
    (progress.csv, result.json) itself, and the TensorBoard one would only cost driver CPU."""
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """While Tune runs, the objects the driver made before (imported modules and what they hold: Ray, Tune,
    MLflow, torch; ~560 k objects) sit in the interpreter's permanent generation (``gc.freeze``), out of the
    cyclic garbage collector's full collections; they go back after (``gc.unfreeze``). Objects made while
    Tune runs are collected as before; garbage cycles made before wait until Tune ends.

    A full collection scans every tracked object: ~350 ms of the driver's CPU when nothing is frozen. A sweep sets
    one off once its surviving allocations pass a quarter of the tracked objects: a 100-trial sweep (MLflow on,
    benchmarks/driver_scaling's trials) had one, and the driver's CPU in the collector went 4.4–4.6 -> 1.1–1.2 ms
    per trial (3 paired sweeps); 16-trial sweeps mostly have none. A process that froze objects itself
    (``gc.get_freeze_count() > 0``) keeps its own arrangement.

    >>> import gc
    >>> with startup_objects_frozen():
    ...     gc.get_freeze_count() > 0
    True
    >>> gc.get_freeze_count()
    0
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def local_session_root() -> Path | None:
    """The folder holding this machine's Ray session folders (``/tmp/ray`` unless Ray was told otherwise);
    None where this driver runs no local Ray node."""
    try:
        return ray_session_root()
    except Exception:  # noqa: BLE001 - not a local node: no staging copies to look at
        return None
