"""Thin helpers around torch.distributed for runs launched with ``torchrun`` (or single-process runs)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "get_rank", "get_world_size", "is_main_process", "setup_distributed",
           "cleanup_distributed", "barrier", "all_reduce_max", "sample_batch_times"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def setup_distributed() -> torch.device:
    """Initialise the process group when launched by torchrun (RANK/WORLD_SIZE set); return this rank's device.

    Backend: nccl on CUDA, gloo on CPU. Without torchrun this is a no-op returning cuda:0 or cpu.
    """
    use_cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(value: float, device=None) -> float:
    """Max of a scalar over all ranks (used so every rank agrees to skip a non-finite step)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sample_batch_times(local_batch_size: int, device=None, dtype=None) -> torch.Tensor:
    """t ~ U(0, 1) for this rank's slice of the global batch, [local_batch_size].

    Draws times for the whole global batch and keeps this rank's contiguous slice, so with the Trainer's
    per-step seeding a run on W processes sees exactly the times a single process with the global batch sees.
    """
    world, rank = get_world_size(), get_rank()
    t = torch.rand(local_batch_size * world, dtype=torch.float64)
    return t[rank * local_batch_size:(rank + 1) * local_batch_size].to(device=device, dtype=dtype or torch.float32)
