"""Stopping `mmpipe schedule` with SIGTERM (systemctl stop) prints no warning.

Prefect's Runner handles SIGTERM by calling its async ``stop`` from inside the event loop
without awaiting it: ``RuntimeWarning: coroutine 'Runner.astop' was never awaited``. The
schedule's runner exits instead, which unwinds ``Runner.start`` (the schedule is paused).
"""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from flows.schedule import create_runner


def _sigterm_inside_the_loop(runner) -> list[str]:
    """What the signal does while ``Runner.start`` runs: the handler called in the loop."""

    async def serving() -> None:
        runner.started = True  # as start() has set it by then
        runner.handle_sigterm()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exc:
            asyncio.run(serving())
        gc.collect()  # an un-awaited coroutine warns when it is collected
    assert exc.value.code == 0  # a clean stop, as before
    return [str(w.message) for w in caught]


def test_a_sigterm_stops_the_schedules_runner_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert _sigterm_inside_the_loop(create_runner()) == []
