"""Distributed data-parallel helpers around ``torch.distributed`` (launched by torchrun).

``torchrun --nproc_per_node N -m breakhis.cli train ...`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; :func:`init_distributed` selects GPU ``LOCAL_RANK`` first, then
joins the process group with ``nccl`` on GPUs and ``gloo`` on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup_distributed",
    "init_distributed",
    "use_cuda",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1


def use_cuda(device: str) -> bool:
    """Whether ``device`` (``"auto"``: CUDA when available, ``"cpu"`` or ``"cuda"``) means CUDA.

    Raises:
        ValueError: for an unknown device string, or ``cuda`` without a GPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', but got {device!r}")
    if device == "auto":
        return torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no GPU is available")
    return device == "cuda"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; pick the device.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: for an unknown device string, ``cuda`` without a GPU, or more
            processes on this machine than it has GPUs (on CUDA).
    """
    cuda = use_cuda(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        gpus = torch.cuda.device_count()
        if local >= gpus:
            raise ValueError(
                f"expected a GPU for each process on this machine, but local rank {local} "
                f"has none: {gpus} {'GPU is' if gpus == 1 else 'GPUs are'} visible; start at "
                f"most {gpus} (torchrun --nproc_per_node {gpus}), or pass --device cpu")
        # before the NCCL group starts: otherwise every rank's communicator (and the
        # barrier's) is set up on GPU 0
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all processes (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every process the main process's buffers of ``module`` (batch-norm running
    statistics), in place; no-op without a process group.

    DDP does so at the start of each training forward, but not after the last one: on
    CPUs (gloo, no ``SyncBatchNorm``) each process then holds the statistics of its own
    share of the last batch, and a validation split over the processes would score the
    model with several sets of statistics, none of them all the saved checkpoint's.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over processes (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
