"""An MLflow client whose database work runs in a helper process, as a tracking server's would.

With a database store (``sqlite:///…``, ``postgresql://…``) ``MlflowClient`` does the store's work in
the calling process: SQLAlchemy sessions, one upsert per metric, ~100 ms of CPU per trial in a sweep's
driver (benchmarks/overhead). :class:`StoreProcessClient` has the same methods, and sends each call to
one helper process that holds the real ``MlflowClient``; the caller spends only the pickling.

Guarantees:

* calls are synchronous and in order (one at a time per client, thread-safe), so what the caller
  knows to be written is written; an exception raised by MLflow in the helper is raised in the caller
  (the same type and message where it pickles, else :class:`StoreProcessError` with both);
* the helper ignores Ctrl-C (the driver decides when tracking stops: it flushes first) and exits when
  its pipe closes, so a killed driver leaves no helper behind; a call after the helper died starts a
  fresh one, a call during which it died raises :class:`StoreProcessError` (the writer retries);
* the helper is this file run as a script: it imports only the standard library and MLflow, not
  losstune's packages (whose ``__init__`` pull in Ray).

Example (a real sqlite store; the helper is started on the first call)::

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> client = StoreProcessClient(f"sqlite:///{os.path.join(folder, 'mlflow.db')}")
    >>> exp = client.create_experiment("demo", artifact_location=os.path.join(folder, "artifacts"))
    >>> run = client.create_run(exp, run_name="trial-0")
    >>> _ = client.log_param(run.info.run_id, "gradient_weight", "0.2")
    >>> client.get_run(run.info.run_id).data.params
    {'gradient_weight': '0.2'}
    >>> client.close()["cpu_s"] > 0
    True
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import Any

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
STORE_PROCESS_MIN_CPUS = 4  # "auto" uses the helper on machines with at least this many cores
_CPU = "__cpu_s__"  # the request for the helper's own CPU seconds


def is_database_uri(uri: str | None) -> bool:
    """True for a tracking URI whose store MLflow runs in the client's process (a database).

    >>> is_database_uri("sqlite:///results/mlflow.db"), is_database_uri("postgresql+psycopg2://db/x")
    (True, True)
    >>> is_database_uri("http://127.0.0.1:5000"), is_database_uri(None)
    (False, False)
    """
    scheme = (uri or "").split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in DATABASE_SCHEMES


def wanted(setting: bool | str, uri: str | None, cpus: int | None = None) -> bool:
    """Whether a sweep's writer should use a helper process (``mlflow.store_process``) for the store at ``uri``.

    Only database stores do their work in the client. ``"auto"``: with at least :data:`STORE_PROCESS_MIN_CPUS`
    cores (``cpus``, default: those this process may run on). The helper costs ~2.5 CPU s to start (MLflow's
    imports, the store's schema check) and does the same store work as the driver would; it pays where a
    core is free for it, not where the trials already use every core.

    >>> wanted("auto", "sqlite:///mlflow.db", cpus=16), wanted("auto", "sqlite:///mlflow.db", cpus=2)
    (True, False)
    >>> wanted(True, "sqlite:///mlflow.db", cpus=2), wanted(True, "http://127.0.0.1:5000")
    (True, False)
    """
    if not is_database_uri(uri) or setting is False:
        return False
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return setting is True or cpus >= STORE_PROCESS_MIN_CPUS


class StoreProcessError(RuntimeError):
    """The helper process died during a call, or MLflow's error could not be sent back as it was."""


class StoreProcessClient:
    """``MlflowClient(tracking_uri=uri)``'s methods, run in a helper process (started on the first call)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.cpu_s = 0.0  # CPU seconds of the helpers that ended (see close)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            return self._call(name, args, kwargs)

        call.__name__ = name
        return call

    @property
    def pid(self) -> int | None:
        """The running helper's process id (None before the first call, after close or its death)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> "StoreProcessClient":
        """Start the helper now (it imports MLflow while the caller goes on); returns this client."""
        with self._lock:
            self._ensure_started()
        return self

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.uri],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._proc

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        with self._lock:
            self._ensure_started()
            try:
                pickle.dump((name, args, kwargs), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self._proc.stdin.flush()
                ok, value = pickle.load(self._proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as err:
                self._proc.kill()  # dead, or out of step with its pipe: the next call starts a fresh helper
                self._proc.wait()
                raise StoreProcessError(f"the MLflow helper process ended during {name}(): {err}") from None
        if not ok:
            raise value
        return value

    def close(self, timeout: float = 10.0) -> dict[str, float]:
        """End the helper (it has answered every call made); returns ``{"cpu_s": ...}``, the CPU seconds
        the helpers of this client spent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return {"cpu_s": self.cpu_s}
            try:
                if proc.poll() is None:
                    pickle.dump((_CPU, (), {}), proc.stdin)
                    proc.stdin.flush()
                    self.cpu_s += pickle.load(proc.stdout)[1]
                proc.stdin.close()
                proc.wait(timeout)
            except (OSError, EOFError, pickle.UnpicklingError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            finally:
                proc.stdout.close()
        return {"cpu_s": self.cpu_s}


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - e.g. an exception whose __init__ needs more than its message
        return StoreProcessError(f"{type(err).__name__}: {err}")


def serve(uri: str) -> None:
    """The helper's loop: ``(method, args, kwargs)`` pickles in on stdin, ``(ok, value)`` out; ends at EOF."""
    import resource

    from mlflow.tracking import MlflowClient

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the replies have stdout to themselves: anything printed goes to stderr
    requests = sys.stdin.buffer
    client = MlflowClient(tracking_uri=uri)
    while True:
        try:
            name, args, kwargs = pickle.load(requests)
        except EOFError:
            return
        if name == _CPU:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            reply = (True, usage.ru_utime + usage.ru_stime)
        else:
            try:
                reply = (True, getattr(client, name)(*args, **kwargs))
            except Exception as err:  # noqa: BLE001 - every MLflow error goes back to the caller
                reply = (False, _picklable(err))
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001 - a result that does not pickle
            data = pickle.dumps((False, StoreProcessError(f"{name}() returned what cannot be sent: {err}")))
        out.write(data)
        out.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: a Ctrl-C while MLflow imports must not end the helper
    # run as a script, this folder would come first on sys.path and its modules (events, run, store …)
    # could shadow top-level ones MLflow imports
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    serve(sys.argv[1])
