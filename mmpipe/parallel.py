"""Process pools for the data stages: safe under a threaded orchestrator, quiet on shutdown.

* forkserver (spawn where unavailable), never fork: Prefect runs tasks in threads, and forking a
  threaded process can deadlock the child on a lock another thread held.
* Workers restore the default SIGTERM handler (an orchestrator's handler must not run in them)
  and ignore SIGINT: Ctrl-C reaches the parent, which terminates the pool.
* A pool that finished its work is closed and joined, not terminated, so shutdown prints nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import BaseContext
from multiprocessing.pool import Pool
from typing import Any

# One forkserver serves every pool of a process, and it imports its preload list only when it
# starts: whichever stage starts it first decides what later workers find already imported. So
# every pool preloads this one list. Measured (benchmarks/README.md): with the first caller's list
# only, each shard worker re-imported albumentations + torch (+2.4 s per shard run, 2 workers no
# faster than 1) and each DataLoader worker re-imported torch (+2 s per loader, every epoch).
PRELOAD = ("mmpipe.synthetic", "mmpipe.ingest", "mmpipe.shard", "mmpipe.data")


def pool_context() -> BaseContext:
    """forkserver with PRELOAD imported once in the server; spawn where unsupported."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _init_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def process_pool(
    workers: int,
    *,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Pool]:
    """A pool of ``workers`` processes; closed + joined on success, terminated on error."""
    pool = pool_context().Pool(workers, initializer=_init_worker, initargs=(initializer, initargs))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def _map_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def ordered_map(
    pool: Pool, fn: Callable[[Any], Any], items: Iterable[Any], *, chunksize: int, depth: int
) -> Iterator[Any]:
    """``pool.imap(fn, items, chunksize)`` with backpressure: at most ``depth`` chunks in flight.

    Pool.imap's feeder thread drains the whole input into the task queue at once, so memory grows
    with the input (every task pickled and queued); here it is bounded by depth * chunksize.
    Results come back in input order, so output bytes do not depend on the worker count.
    """
    it = iter(items)
    pending: deque[Any] = deque()

    def submit() -> None:
        chunk = list(itertools.islice(it, chunksize))
        if chunk:
            pending.append(pool.apply_async(_map_chunk, (fn, chunk)))

    for _ in range(depth):
        submit()
    while pending:
        results = pending.popleft().get()
        submit()
        yield from results
