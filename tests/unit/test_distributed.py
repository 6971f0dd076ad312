"""The ranks of a job agree on their data version, or every rank learns they do not (two gloo
processes on this machine)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp

from mmpipe.distributed import Dist, init_distributed, same_on_every_rank


def _rank(rank: int, texts: list[list[str]], port: int, out) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    d = init_distributed("cpu")
    try:
        out.put((rank, [same_on_every_rank(t, d) for t in texts[rank]]))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _agree(texts: list[list[str]]) -> dict[int, list[bool]]:
    """Each rank's answers for its texts (rank r asks about texts[r][i] in round i)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_rank, args=(texts, port, out), nprocs=2, start_method="spawn")
    return dict(out.get(timeout=60) for _ in range(2))


def test_ranks_agree_only_on_the_same_version():
    assert same_on_every_rank("anything", Dist())  # one process: nothing to compare
    sha = "ab" * 32
    # round 1 the same version on both ranks, round 2 one character apart
    answers = _agree([[sha, sha], [sha, sha[:-1] + "c"]])
    assert answers == {0: [True, False], 1: [True, False]}
