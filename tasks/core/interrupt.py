"""Stopping on a signal: SIGINT (Ctrl-C), SIGTERM (systemd, Kubernetes) and SIGHUP (a
closed terminal) all become one exception in the main thread, so every ``finally`` on
the way out runs: the stage's MLflow run is closed, the run is marked interrupted, a
server this process started is stopped, the home's lock is released.

Only the first signal interrupts. The way out is bounded (servers get a grace period,
then SIGKILL), and a second Ctrl-C landing in the middle of it would abort exactly the
clean-up that keeps processes from being left behind; later signals are logged and
otherwise ignored until the block exits.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal (a KeyboardInterrupt, so code that
    handles Ctrl-C - Prefect's engines, PyTorch's data loaders - treats it as one)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a death by signal N: 128 + N."""
        return 128 + self.signum


def interrupt_of(exc: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` behind ``exc``: itself, or one in its cause/context chain
    (Prefect re-raises a SIGTERM as its own TerminationSignal, a library may wrap a
    KeyboardInterrupt)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Interrupted):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def is_interrupt(exc: BaseException) -> bool:
    """A stop asked for from outside (a signal, Ctrl-C), not a failure of the work."""
    if isinstance(exc, KeyboardInterrupt) or interrupt_of(exc) is not None:
        return True
    # Prefect turns SIGTERM into its own TerminationSignal while a flow runs.
    return type(exc).__name__ == "TerminationSignal"


_received: list[int] | None = None  # set while a handler of ours is installed
_deferring = 0  # depth of deferred() blocks
_held: list[int] = []  # a first signal that arrived inside one


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the interrupt of a signal that arrives inside the block until the block has
    finished: for a write and its record that must not be torn apart (a metric sent to
    MLflow and the journal line saying so; torn, a resume logs that step twice)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _deferring == 0 and _held:
        raise Interrupted(_held.pop())


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[list[int]]:
    """Raise :class:`Interrupted` on the first of SIGINT/SIGTERM/SIGHUP; yields the list
    of signals received. Re-entrant: a nested block shares the outer one's handler, so
    "first" means first for the process. Outside the main thread (where Python allows
    no handlers) it does nothing."""
    global _received
    if _received is not None:
        yield _received
        return
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:
            if _deferring:
                _held.append(signum)
                return
            raise Interrupted(signum)
        log.warning("%s again: already stopping", signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    _received = received
    try:
        yield received
    finally:
        _received = None
        _held.clear()
        for s, h in old.items():
            signal.signal(s, h)
