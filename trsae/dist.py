"""Multi-process runs under ``torchrun``: the rank and world size of this process and the few collective
operations the trainer and the harvester need (no-ops in a single process). ``gloo`` on CPU, ``nccl`` on GPU."""

from __future__ import annotations

import atexit
import os

import torch


def dist_context() -> tuple[int, int]:
    """(rank, world size): torchrun's process group when launched under it (initialised here), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # each process on its own GPU; device "cuda" then means that one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # left to interpreter exit, gloo's threads were sometimes torn down mid-flight ("terminate called
        # without an active exception", exit -6 in about 1 run in 10)
        atexit.register(_shutdown)
    return dist.get_rank(), dist.get_world_size()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """The collective operations the trainer needs; no-ops in a single process."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.main = rank == 0

    @classmethod
    def current(cls) -> "Ranks":
        return cls(*dist_context())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, batch):
        """This rank's training crops of a global batch (every world-th, starting at its rank)."""
        if self.world == 1:
            return batch
        return type(batch)(*(t[self.rank::self.world] for t in batch))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def broadcast_params_(self, sae: torch.nn.Module) -> None:
        if self.world > 1:
            for t in [*sae.parameters(), *sae.buffers()]:
                torch.distributed.broadcast(t.data, 0)

    def average_grads_(self, sae: torch.nn.Module) -> None:
        """Mean of the ranks' gradients (each rank's loss is a mean over its tokens; the shares are equal)."""
        if self.world == 1:
            return
        params = list(sae.parameters())
        for p in params:  # a parameter without a gradient on one rank takes part with zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum_(flat).div_(self.world)
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()
