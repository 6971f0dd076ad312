"""Progress of long loops: tqdm's bar on a terminal, a log line every N seconds elsewhere.

tqdm with ``disable=None`` draws nothing when its output is not a terminal: the flow's logs,
Prefect's UI, a cron mail or a systemd journal then hear nothing from a 19-minute epoch until it
ends. This ``tqdm`` is tqdm's, except there: it logs ``desc: n/total (pct), rate, ETA`` at INFO
every ``MMPIPE_PROGRESS_SECONDS`` (default 60), and once when the loop ends. Stages import it in
place of tqdm's (``from mmpipe.progress import tqdm``); ``disable=True`` (e.g. ranks other than
0) still says nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm as _tqdm

log = logging.getLogger(__name__)

ENV = "MMPIPE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 60.0


def interval() -> float:
    """Seconds between two progress lines (``MMPIPE_PROGRESS_SECONDS``, default 60)."""
    try:
        return max(0.0, float(os.environ.get(ENV, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def describe(desc: str, n: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    """``epoch 1/8: 120/500 batches (24%), 3.1 it/s, ETA 2m03s`` (no ETA without a total)."""
    rate = n / elapsed if elapsed > 0 else 0.0
    done = f"{n}/{total} ({100 * n / total:.0f}%)" if total else f"{n}"
    eta = f", ETA {_duration((total - n) / rate)}" if total and rate > 0 and n < total else ""
    return f"{desc or 'progress'}: {done}, {rate:.3g} {unit}/s, {_duration(elapsed)} so far{eta}"


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm.tqdm)
    """tqdm, logging its progress every ``interval()`` seconds where it draws no bar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        stream = kwargs.get("file") or sys.stderr
        isatty = getattr(stream, "isatty", lambda: False)
        self._logs = kwargs.get("disable", False) is None and not isatty()
        super().__init__(*args, **kwargs)
        if self._logs:
            self._count, self._started = self.n, time.monotonic()
            self._last, self._every = self._started, interval()
            self._about = (kwargs.get("desc") or "", kwargs.get("unit") or "it")

    def update(self, n: float | None = 1) -> bool | None:
        if self._logs and n:
            self._count += int(n)
            now = time.monotonic()
            if now - self._last >= self._every:
                self._last = now
                self._say(now)
        return super().update(n)

    def __iter__(self) -> Iterator[Any]:
        if not self._logs:
            yield from super().__iter__()
            return
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()  # not when abandoned (an error mid-loop): nothing after the error's line

    def close(self) -> None:
        if getattr(self, "_logs", False) and getattr(self, "_started", None) is not None:
            self._say(time.monotonic())
            self._started = None  # once, however often close() is called
        super().close()

    def __del__(self) -> None:
        self._started = None  # collected, not closed: its last line would come after any error
        super().__del__()

    def _say(self, now: float) -> None:
        desc, unit = self._about
        total = int(self.total) if self.total else None
        log.info("%s", describe(desc, self._count, total, now - self._started, unit))
