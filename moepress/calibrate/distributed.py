"""Calibration over several processes (`torchrun --nproc-per-node G -m moepress calibrate ...`):
each rank takes a contiguous slice of the sequences, and statistics are merged across ranks with
the parallel (Chan) rule in rank order, so every rank ends with the same result as one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moepress.calibrate.stats import CalibrationStats


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_if_needed() -> torch.device | None:
    """Start the process group under torchrun; returns this rank's device (None when single)."""
    rank, size = world()
    if size == 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def shard(input_ids: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return torch.tensor_split(input_ids, size)[rank]


def all_merge(stats: CalibrationStats) -> CalibrationStats:
    """Every rank's statistics merged in rank order (sums and counts add; moments merge)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    gathered: list[CalibrationStats | None] = [None] * dist.get_world_size()
    cpu = CalibrationStats({i: s for i, s in stats.layers.items()}, dict(stats.meta))
    dist.all_gather_object(gathered, cpu)
    merged = gathered[0]
    for other in gathered[1:]:
        merged.merge(other)
    merged.meta["num_sequences"] = sum(g.meta.get("num_sequences", 0) for g in gathered)
    merged.meta["world_size"] = dist.get_world_size()
    return merged
