"""Fault injection for the crash-safety tests: die (or get a signal) at a named write boundary.

    MMPIPE_FAULT=commit:before-switch python -m mmpipe shard   # SIGKILL right before the switch
    MMPIPE_FAULT=train:step:3 python -m mmpipe train           # SIGKILL at the 3rd hit of the point
    MMPIPE_FAULT=train:step:3 MMPIPE_FAULT_SIGNAL=SIGTERM ...  # a SIGTERM there instead

Production code calls :func:`fault_point` at each boundary where a kill -9 must leave the old or the
new output, never a mix (the fault battery, tests/faults/, lists them). Unset (always, outside
tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MMPIPE_FAULT"
SIGNAL_ENV = "MMPIPE_FAULT_SIGNAL"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Signal this process when ``$MMPIPE_FAULT`` is ``name`` (or ``name:N`` at the N-th hit).

    The signal is SIGKILL unless ``$MMPIPE_FAULT_SIGNAL`` names another (e.g. SIGTERM).
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth):
        os.kill(os.getpid(), signal.Signals[os.environ.get(SIGNAL_ENV, "SIGKILL")])
