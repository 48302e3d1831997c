"""torch.distributed under torchrun: one process per GPU (NCCL) or CPU process (gloo); rank 0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from tntcli.errors import TntError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistEnv:
    """Join the process group torchrun describes in the environment; a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars over ranks (loss sums, correct counts, sample counts)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank if any rank raised `flag` (e.g. a preemption signal seen by one process)."""
    return bool(all_reduce_sum([float(flag)], env)[0]) if env.enabled else flag


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of a small picklable object, on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    """Every rank waits here for all the others (e.g. until rank 0's checkpoint is on disk)."""
    if env.enabled:
        dist.barrier()


def together(work: Callable[[], T], env: DistEnv, what: str) -> T:
    """Run `work` on every rank; if it fails on any rank, fail on all of them with that rank's message.

    Without this, a rank that fails alone (a missing package, a bad file) exits while the others wait forever
    in their next collective (DDP's first broadcast)."""
    if not env.enabled:
        return work()
    result, problem, error = None, None, None
    try:
        result = work()
    except Exception as err:           # noqa: BLE001 - reported to every rank below, then raised
        error = err
        problem = str(err) if isinstance(err, TntError) else f"{type(err).__name__}: {err}"
    problems: list[str | None] = [None] * env.world_size
    dist.all_gather_object(problems, problem)
    failed = [(rank, text) for rank, text in enumerate(problems) if text]
    if failed:
        rank, text = failed[0]
        raise TntError(f"{what} failed on rank {rank}: {text}") from error
    return result
