"""Where this process sits in a ``torchrun`` job, and the few collectives training needs.

One process (no WORLD_SIZE, or 1): every helper is the identity. Under ``torchrun`` (env
WORLD_SIZE / RANK / LOCAL_RANK) the process group uses nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only rank 0 writes checkpoints, reports and logs."""
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    """Read torchrun's env; init the process group (nccl on CUDA, gloo on CPU) if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device_pref != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        d.owns_group = True
    return d


def close_distributed(d: Dist) -> None:
    """Tear down the process group if ``init_distributed`` created it."""
    if d.owns_group:
        dist.destroy_process_group()


def all_gather_grad(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate ``x`` (b, ...) of every rank -> (W*b, ...); gradients flow back to each rank."""
    if not d.enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (no gradient)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def same_on_every_rank(text: str, d: Dist) -> bool:
    """Whether ``text`` (a data version) is the same on every rank (True in one process).

    128 bits of its sha256 as four int64 (32 bits each, exact), reduced by MIN and by MAX."""
    if not d.enabled:
        return True
    digest = hashlib.sha256(text.encode()).digest()[:16]
    words = [int.from_bytes(digest[i : i + 4], "big") for i in range(0, 16, 4)]
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", d.local_rank) if cuda else torch.device("cpu")
    low = torch.tensor(words, dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return torch.equal(low, high)


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in one process)."""
    if d.enabled:
        dist.barrier()
