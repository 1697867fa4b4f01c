"""Data-parallel training under torchrun / accelerate launch (DDP). No home-made distribution: torch.distributed does
the work; this module only reads the launcher's environment, shards global batches and launches torchrun for --nproc.

Every rank runs the same pipeline on the same data and seed, so every rank builds the same global batches; each rank
trains on its slice of every global batch and DDP averages the gradients, which equals one process on the whole batch.
Only rank 0 writes the run folder, the report and the registry.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The process's place in the launch, from the variables torchrun and accelerate set."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(device_type: str) -> World:
    """Join the process group when launched with more than one process (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    w = world()
    if w.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return w


def shard(idx: np.ndarray, w: World) -> np.ndarray:
    """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
    return np.array_split(idx, w.size)[w.rank]


def wrap(model, w: World, strategy: str = "ddp"):
    """DDP around the model when distributed; the model itself otherwise."""
    if not w.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(value, w: World):
    """Sum a tensor over ranks (a no-op in one process)."""
    if w.distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(w: World) -> None:
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun on this machine with `nproc` processes, running the same fmtune command without --nproc."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "fmtune.cli", *argv]
