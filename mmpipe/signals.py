"""SIGTERM (and Ctrl-C in training) as a clean stop: one handler, one stop flag, one error.

    signals.install()              # the CLI, first thing: SIGTERM raises Interrupted at once
    with signals.deferred():       # train: a signal only sets the flag ...
        ...                        # ... and the loop checkpoints at the next step boundary
    signals.raise_if_requested()   # between stages: stop if a signal came meanwhile

Outside a ``deferred`` block the handler raises :class:`Interrupted` wherever the main thread is,
as Ctrl-C raises KeyboardInterrupt: a data stage's staging directory is removed on the way out
and the previous output stays. Inside one (training) it only sets the flag, so no half-written
checkpoint and no lost step: the loop saves, then raises ``Interrupted`` itself.

Python runs signal handlers in the main thread only. ``deferred`` installs the flag handler when
it is entered in the main thread (Prefect 3.8.8 runs a flow's tasks there: measured) and restores
the previous one (e.g. Prefect's own SIGTERM bridge) on exit; entered in another thread it cannot
install anything and relies on a handler of the main thread (``install``) setting the flag, which
the loop polls either way.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from mmpipe.errors import MmpipeError

log = logging.getLogger(__name__)

_stop = threading.Event()
_received: list[int] = []  # the signals received since the last reset, in order
_deferring = 0  # depth of deferred() blocks, any thread
_guard = threading.Lock()


class Interrupted(MmpipeError):
    """A stage stopped on SIGTERM/SIGINT; the CLI exits 128 + the signal number (143, 130)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for "terminated by signal N"."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """SIGTERM, SIGINT, ... (the number if unknown)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _handle(signum: int, frame: Any) -> None:
    _received.append(signum)
    _stop.set()
    if _deferring:
        log.warning("%s: stopping at the next safe point (checkpoint first)", signal_name(signum))
        return
    raise Interrupted(f"interrupted by {signal_name(signum)}", signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """Route SIGTERM to mmpipe's handler for the rest of the process (main thread only); a
    command line calls it first thing, so no moment of its run has Python's default (die at
    once, nothing cleaned up, no message)."""
    reset()
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _handle)


def requested() -> int | None:
    """The first signal received since the last reset, or None."""
    return _received[0] if _stop.is_set() and _received else None


def raise_if_requested(what: str = "") -> None:
    """Raise Interrupted if a signal came (e.g. while a stage was finishing)."""
    signum = requested()
    if signum is not None:
        where = f" {what}" if what else ""
        raise Interrupted(f"interrupted by {signal_name(signum)}{where}", signum)


def reset() -> None:
    """Forget earlier signals (a new run in the same process, tests)."""
    _stop.clear()
    _received.clear()


@contextlib.contextmanager
def deferred(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Inside the block a signal only sets the flag (``requested()``); nothing is raised."""
    global _deferring
    previous: dict[int, Any] = {}
    if _in_main_thread():
        for signum in signums:
            previous[signum] = signal.signal(signum, _handle)
    with _guard:
        _deferring += 1
    try:
        yield
    finally:
        with _guard:
            _deferring -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
