"""Fault injection for the crash-safety tests: die with SIGKILL at a named write boundary.

    MMPIPE_FAULT=commit:before-swap python -m mmpipe shard     # killed right before the switch
    MMPIPE_FAULT=train:epoch-end:2 python -m mmpipe train      # killed at the 2nd hit of the point

Production code calls :func:`fault_point` at each boundary where a kill -9 must leave the old or the
new output, never a mix. Unset (always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MMPIPE_FAULT"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process when ``$MMPIPE_FAULT`` is ``name`` (or ``name:N`` at the N-th hit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
