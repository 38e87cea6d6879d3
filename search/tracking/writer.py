"""The writer thread: Tune's events in, MLflow writes and ``mlflow_runs.json`` out, off the driver's loop.

Each wake-up it gathers the events queued for up to ``flush_interval`` seconds, records them
(:class:`PendingWrites`, the :class:`RunsBook`), saves the runs file if it changed, and writes what
is pending per child run in batches (:class:`ChildRuns`: a run's params, metrics, tags and images at most
``METRICS_EVERY_S`` after it was made or last written; everything at once on a flush and at the end).
While the tracking server is down the writes stay pending and are retried with backoff (0.5 s doubling
up to 30 s); trials keep running meanwhile, and their results stay in Ray's trial folders for
``losstune export`` and the backfill.
:meth:`TrackingWriter.close` keeps retrying until its deadline, then says what it gave up.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from losstune.search.status import TrialStatus
from losstune.search.tracking.child_runs import ChildRuns
from losstune.search.tracking.events import Event, Flush, Stop, TrialMarked
from losstune.search.tracking.pending import PendingWrites
from losstune.search.tracking.runs_file import RunsBook
from losstune.search.tracking.store import mlflow_client
from losstune.search.tracking.store_process import StoreProcessClient

logger = logging.getLogger("losstune.tracking")

MAX_BACKOFF_S = 30.0


class TrackingWriter:
    """The background writer of one sweep's child runs (``tracking_uri=None``: the runs file only).

    ``store_process``: the MLflow calls go to a :class:`StoreProcessClient` (its CPU is ``store_process_cpu_s``
    in :meth:`stats`), for database stores only (:func:`losstune.search.tracking.store_process.wanted`).

    :meth:`put` is the only call on the driver's hot path (a queue put); the rest is the driver's
    API at the sweep's start and end.
    """

    def __init__(self, book: RunsBook, tracking_uri: str | None, experiment_id: str | None,
                 parent_run_id: str | None, tags: Mapping[str, str], decode: Callable | None = None,
                 flush_interval: float = 0.5, flush_timeout: float = 60.0, store_process: bool = False):
        self.book = book
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.tags = dict(tags)
        self.flush_interval, self.flush_timeout = flush_interval, flush_timeout
        self.pending = PendingWrites(book, decode, mlflow=tracking_uri is not None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.put: Callable[[Event], None] = self._queue.put
        self._thread = threading.Thread(target=self._run, name="losstune-mlflow", daemon=True)
        self._deadline = math.inf
        self._waiters: list[threading.Event] = []
        self.store_process = store_process
        self._helper: StoreProcessClient | None = None  # started with the thread: it imports MLflow meanwhile
        self._runs: ChildRuns | None = None  # made on the first write (the client needs the server only then)
        self.store_cpu_s = 0.0
        self.errors = 0
        self.last_error: str | None = None
        self.dropped_metrics = 0

    def start(self) -> None:
        """Read ``mlflow_runs.json`` (entries the book lacks), then start the thread."""
        self.book.load()
        if self.tracking_uri is not None and self.store_process:
            # a database store's (sqlite) SQLAlchemy work runs in a helper process, off the driver's CPU, as a
            # tracking server's would
            self._helper = StoreProcessClient(self.tracking_uri).start()
        self._thread.start()

    # ----- the driver's API ------------------------------------------------------------------------
    def mark_interrupted(self, trial_ids: Iterable[str] | None = None) -> None:
        """Child runs of trials that did not end: status ``interrupted`` (KILLED) until ``--resume``."""
        for trial_id in self.book.mark_interrupted(trial_ids):
            self.put(TrialMarked(trial_id, TrialStatus.INTERRUPTED))

    def mark_lost(self, known_trial_ids: Iterable[str]) -> list[str]:
        """Trials that had not ended and that ``known_trial_ids`` lacks become ``lost`` (child run KILLED,
        if one was made); returns their ids."""
        lost = self.book.mark_lost(known_trial_ids)
        for trial_id in lost:
            self.put(TrialMarked(trial_id, TrialStatus.LOST))
        return lost

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or ``timeout`` s); True when all was written."""
        if not self._thread.is_alive():
            return not self._pending()
        done = threading.Event()
        self.put(Flush(done))
        return done.wait(self.flush_timeout if timeout is None else timeout) and not self._pending()

    def close(self, timeout: float | None = None) -> None:
        """Write what is pending (retrying up to ``timeout`` s while the server is down), stop the thread."""
        if self._thread.is_alive():
            self._deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
            self.put(Stop())
            self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)
            if self._thread.is_alive():  # stuck in a call to a dead server: leave it (daemon thread)
                self.dropped_metrics = self.pending.num_metrics()
                logger.warning("MLflow: gave up waiting for the tracking server; %d metric values not "
                               "written (they are still in Ray's results)", self.dropped_metrics)
        self.book.save()

    def stats(self) -> dict[str, Any]:
        return {"batches": self._runs.num_batches if self._runs else 0, "errors": self.errors,
                "dropped_metrics": self.dropped_metrics, "store_process_cpu_s": self.store_cpu_s}

    # ----- the thread --------------------------------------------------------------------------------
    def _pending(self) -> bool:
        return self.pending.any()

    def _collect(self, wait: float) -> list[Event]:
        """Block up to ``wait`` s for an event, then gather more for up to ``flush_interval`` s."""
        try:
            events = [self._queue.get(timeout=max(0.001, wait))]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.flush_interval
        while not isinstance(events[-1], (Flush, Stop)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                events.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def _wake_waiters(self) -> None:
        for w in self._waiters:
            w.set()
        self._waiters.clear()

    def _run(self) -> None:
        failures, next_try = 0, 0.0
        stopping = False
        flushing = False  # a Flush came: write everything, held metrics too, until a sync succeeds
        while True:
            now = time.monotonic()
            wait = self.flush_interval if next_try <= now else min(self.flush_interval, next_try - now)
            for event in self._collect(wait):
                if isinstance(event, Stop):
                    stopping = True
                elif isinstance(event, Flush):
                    flushing = True
                    if event.done is not None:
                        self._waiters.append(event.done)
                else:
                    self.pending.apply(event)
            if self.book.due():
                self.book.save()
            if self._pending() and time.monotonic() >= next_try:
                try:
                    if self._runs is None:
                        in_process = self._helper is None  # with the helper, uploads run there, by MLflow's own path
                        client = mlflow_client(self.tracking_uri) if in_process else self._helper
                        self._runs = ChildRuns(client, self.experiment_id, self.parent_run_id, self.tags, self.book,
                                               self.tracking_uri if in_process else None)
                    self._runs.sync(self.pending, everything=flushing or stopping)
                    flushing = False
                    if failures:
                        logger.warning("MLflow is reachable again; pending metrics written")
                    failures, next_try = 0, 0.0
                except Exception as err:  # noqa: BLE001 - keep the trials running, retry later
                    self.errors += 1
                    self.last_error = f"{type(err).__name__}: {err}"
                    if failures == 0:
                        logger.warning("MLflow logging failed (%s); retrying in the background", self.last_error)
                    failures += 1
                    next_try = time.monotonic() + min(MAX_BACKOFF_S, 0.5 * 2 ** failures)
            pending = self._pending()
            if not pending and self._queue.empty():
                self._wake_waiters()
            if stopping and (not pending or time.monotonic() >= self._deadline):
                if pending and not self.dropped_metrics:
                    self.dropped_metrics = self.pending.num_metrics()
                    logger.warning("MLflow: gave up on %d metric values (%s); they are still in Ray's results",
                                   self.dropped_metrics, self.last_error)
                self.book.save()
                if self._helper is not None:
                    self.store_cpu_s = self._helper.close()["cpu_s"]
                self._wake_waiters()
                return
            if stopping:
                next_try = min(next_try, self._deadline)
