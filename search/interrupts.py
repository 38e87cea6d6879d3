"""Ctrl-C at safe points: the first press only sets an event that the work checks where stopping is safe;
a second press interrupts at once (the previous SIGINT handler, normally KeyboardInterrupt).

Why: a KeyboardInterrupt raised at an arbitrary point landed inside SQLAlchemy (MLflow's store) and
left a half-done connection with a traceback, was swallowed inside a finalizer ("Exception ignored in
...") so the work ran on, or, inside ``ray.init``, made the exit segfault.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

# what the first Ctrl-C prints while a sweep or a verification sets up (both stop at their next safe point)
CTRL_C_NOTICE = "[losstune] Ctrl-C: stopping at the next safe point (press it again to stop at once)"


@contextlib.contextmanager
def first_ctrl_c_sets_event(notice: str | None = None) -> Iterator[threading.Event]:
    """While the block runs, the first Ctrl-C sets the yielded event (and writes ``notice`` to stderr);
    the handler before it is back for a second press and after the block. Outside the main thread
    (signal handlers live there) nothing changes: the event is never set."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum, frame) -> None:
        pressed.set()
        signal.signal(signal.SIGINT, previous)
        if notice:
            try:  # os.write: a print() here could re-enter a print the handler interrupted
                os.write(sys.stderr.fileno(), notice.encode() + b"\n")
            except (OSError, ValueError, AttributeError):  # no real stderr (e.g. a notebook)
                pass

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
