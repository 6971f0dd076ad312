"""malloc settings per kind of work (mmpipe.io): data stages, shard's photos, torch work."""

from __future__ import annotations

import subprocess
import sys

import pytest

_FAULTS = """
import resource, sys
import numpy as np
from mmpipe.io import (IMAGE_MMAP_THRESHOLD, _libc, use_compute_allocator,
                       use_system_arrow_allocator)

def faults(nbytes):
    '''Minor page faults of 100 allocate-touch-free cycles of an nbytes buffer (warm first).'''
    np.ones(nbytes // 8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        np.ones(nbytes // 8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if _libc() is None:
    print("no glibc"); sys.exit(0)
use_system_arrow_allocator(); arrow = faults(2 << 20)
use_system_arrow_allocator(IMAGE_MMAP_THRESHOLD); image = faults(1 << 20)
use_system_arrow_allocator(); use_compute_allocator(); compute = faults(16 << 20)
print(arrow, image, compute)
"""


def test_torch_work_after_a_data_stage_reuses_memory_instead_of_faulting_it_in():
    """A data stage's malloc setting (every buffer >= 256 KiB mapped afresh, so RSS follows live
    data) must not outlive it: `mmpipe run` and the nightly flow train in the same process, and
    under it a training step cost 1.6x the CPU. Shard keeps photo-sized buffers in the heap."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True
    ).stdout.split()
    if out == ["no", "glibc"]:
        pytest.skip("mallopt is glibc's: nothing is tuned on this libc")
    arrow, image, compute = map(int, out)
    assert arrow >= 100 * 400  # 2 MiB = 512 pages, mapped and faulted in on each allocation
    assert image < 100 * 20  # a 1 MiB photo buffer comes from the heap: no fresh pages
    assert compute < 100 * 20  # 16 MiB tensors too, after use_compute_allocator
