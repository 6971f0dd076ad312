"""Process pools (and a dask.distributed cluster) for the data stages' per-chunk work.

* forkserver (spawn where unavailable), never fork: Prefect runs tasks in threads, and forking a
  threaded process can deadlock the child on a lock another thread held.
* Workers restore the default SIGTERM handler (an orchestrator's handler must not run in them)
  and ignore SIGINT: Ctrl-C reaches the parent, which terminates the pool.
* A pool that finished its work is closed and joined, not terminated, so shutdown prints nothing.
* ``executor: dask`` sends the same chunks, to the same functions, to a dask.distributed cluster
  (``dask_map``) and consumes the results in the same order: the stage's bytes do not change.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import BaseContext
from multiprocessing.pool import Pool
from typing import Any

from mmpipe.faults import fault_point

# One forkserver serves every pool of a process, and it imports its preload list only when it
# starts: whichever stage starts it first decides what later workers find already imported. So
# every pool preloads this one list. Measured (benchmarks/README.md): with the first caller's list
# only, each shard worker re-imported albumentations + torch (+2.4 s per shard run, 2 workers no
# faster than 1) and each DataLoader worker re-imported torch (+2 s per loader, every epoch).
PRELOAD = ("mmpipe.synthetic", "mmpipe.ingest", "mmpipe.curate", "mmpipe.shard", "mmpipe.data")


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


def in_order(
    start: Callable[[list[Any]], Callable[[], list[Any]]],
    items: Iterable[Any],
    *,
    chunksize: int,
    depth: int,
) -> Iterator[Any]:
    """Chunks of ``items`` started by ``start`` (which returns the wait for the chunk's results),
    at most ``depth`` in flight; results in input order."""
    it = iter(items)
    pending: deque[Callable[[], list[Any]]] = deque()

    def submit() -> None:
        chunk = list(itertools.islice(it, chunksize))
        if chunk:
            pending.append(start(chunk))

    for _ in range(depth):
        submit()
    while pending:
        results = pending.popleft()()
        submit()
        yield from results


def ordered_map(
    pool: Pool, fn: Callable[[Any], Any], items: Iterable[Any], *, chunksize: int, depth: int
) -> Iterator[Any]:
    """``pool.imap(fn, items, chunksize)`` with backpressure: at most ``depth`` chunks in flight.

    Pool.imap's feeder thread drains the whole input into the task queue at once, so memory grows
    with the input (every task pickled and queued); here it is bounded by depth * chunksize.
    Results come back in input order, so output bytes do not depend on the worker count.
    """

    def start(chunk: list[Any]) -> Callable[[], list[Any]]:
        return pool.apply_async(_map_chunk, (fn, chunk)).get

    yield from in_order(start, items, chunksize=chunksize, depth=depth)


# ----------------------------------------------------------------------------- dask.distributed

RETRIES = 2  # a chunk that raised is re-run this many times by the scheduler before failing
_DASK_LOCK = threading.Lock()
_DASK_READY: set[str] = set()


def _dask_chunk(
    token: str,
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
    fn: Callable[[Any], Any],
    chunk: list[Any],
) -> list[Any]:
    """A Dask task: run the initializer once per worker process and map, one chunk at a time.

    The stage functions keep per-process state (their pool initializer's settings, an image
    cache), so chunks of one worker process are serialised even when it runs several threads.
    """
    with _DASK_LOCK:
        if token not in _DASK_READY:
            if initializer is not None:
                initializer(*initargs)
            _DASK_READY.clear()
            _DASK_READY.add(token)
        fault_point("dask:chunk")
        return _map_chunk(fn, chunk)


@contextlib.contextmanager
def dask_client(address: str | None, workers: int) -> Iterator[Any]:
    """A client of the scheduler at ``address``, or of a LocalCluster of ``workers`` processes.

    The LocalCluster listens on 127.0.0.1 only and has no dashboard; it lives as long as the
    client. A remote cluster's workers must import this mmpipe and read the data root's paths.
    """
    from distributed import Client, LocalCluster

    if address:
        with Client(address, set_as_default=False) as client:
            yield client
        return
    # distributed's nannies run in this process and set their workers' pre-spawn environment
    # (OMP/MKL/OPENBLAS_NUM_THREADS=1, PYTHONHASHSEED, ...) in *this* process's os.environ, at
    # start and at every worker restart: the rest of the process (a flow's training: one MKL
    # thread instead of two changed its floats) and its children must not inherit it
    saved = os.environ.copy()
    try:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        with cluster, Client(cluster, set_as_default=False) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(saved)


def dask_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    address: str | None,
    workers: int,
    chunksize: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Any]:
    """``ordered_map`` on a dask.distributed cluster: same chunks, same order, same results.

    At most 4 chunks per cluster worker are in flight. The scheduler re-runs a chunk whose
    worker died (and a chunk that raised, ``RETRIES`` times); results are consumed in input
    order by the caller alone, so a re-run chunk can neither be lost nor counted twice.
    """
    token = uuid.uuid4().hex
    # closing the client on the way out (error or early stop) releases every pending chunk
    with dask_client(address, workers) as client:
        depth = 4 * max(1, len(client.scheduler_info(n_workers=-1)["workers"]))

        def start(chunk: list[Any]) -> Callable[[], list[Any]]:
            args = (token, initializer, initargs, fn, chunk)
            return client.submit(_dask_chunk, *args, retries=RETRIES, pure=False).result

        yield from in_order(start, items, chunksize=chunksize, depth=depth)
