"""A local Ray started by the driver must not outlive it.

Ray's head processes share the driver's fate, but its agents (dashboard / runtime-env agent) wait up to
a minute on the dead GCS before they exit when the driver is SIGKILLed. The watchdog is a separate
process (``python -m losstune.search.watchdog DRIVER_PID PSUTIL_DIR``) that remembers the driver's
descendants while the driver lives and kills them once it is gone. It uses the psutil that Ray ships in
its ``thirdparty_files`` folder (``PSUTIL_DIR``), so losstune needs no psutil of its own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("losstune")

POLL_S = 0.5  # how often the driver's descendants are listed while it lives


def watch(driver_pid: int) -> None:
    """Until the driver ``driver_pid`` is gone, remember its descendants; then kill those still running."""
    import psutil

    me, known = os.getpid(), {}
    try:
        driver = psutil.Process(driver_pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
            for p in driver.children(recursive=True):
                if p.pid != me:
                    known.setdefault(p.pid, p)
            time.sleep(POLL_S)
    except psutil.Error:
        pass
    targets = []
    for p in known.values():
        try:
            if p.is_running():  # psutil checks the start time: a reused pid is not ours
                targets += [p] + p.children(recursive=True)
        except psutil.Error:
            pass
    for p in targets:
        try:
            p.kill()
        except psutil.Error:
            pass


def start_watchdog() -> subprocess.Popen | None:
    """Start the watchdog of this driver's local Ray processes (None if the process cannot start)."""
    import ray

    psutil_dir = Path(ray.__file__).parent / "thirdparty_files"
    try:
        return subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(psutil_dir)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as err:  # pragma: no cover
        logger.warning("no watchdog for the local Ray processes: %s", err)
        return None


def stop_watchdog(proc: subprocess.Popen) -> None:
    """Ray was shut down normally: end the watchdog we started (by its pid)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    driver_pid, psutil_dir = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, psutil_dir)
    watch(int(driver_pid))


if __name__ == "__main__":
    main()
