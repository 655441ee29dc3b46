"""How many intra-op threads and data-loader workers the tool uses: the one place that decides it.

The choice never exceeds the cores this process may use (its CPU affinity and a cgroup CPU quota), shared by
torchrun's processes on the node. In-memory datasets get no worker processes. Models whose operations are small
train on one intra-op thread: for them OpenMP's fork/join costs more than a second core gives back, and beside
another busy process a thread that waits on a descheduled peer loses several times the work
(benchmarks/README.md#threads). An explicit `OMP_NUM_THREADS` or `num_workers` always wins.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

CGROUP = Path("/sys/fs/cgroup")
# A training step's mean work per layer with a weight matrix (forward FLOPs × batch) below which one intra-op
# thread is used: about a millisecond on one core. The quickstart's is ~16 MFLOP; ViT-Tiny (patch 4) on CIFAR at
# batch 256 ~3.5 GFLOP, ResNet-18 ~0.9 GFLOP.
SMALL_OP_FLOPS = 64e6


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """The CPU quota of this cgroup in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cores(root: Path = CGROUP) -> int:
    """Cores this process may run on: its affinity, capped by the cgroup quota (rounded up), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def cores_per_process(root: Path = CGROUP) -> int:
    """This process's share of the usable cores: torchrun's processes on one node split them."""
    return max(usable_cores(root) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def in_memory(dataset: Dataset) -> bool:
    """A dataset whose samples are tensors already in memory (digits, fake, a TensorDataset): workers only cost."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


def data_workers(requested: int | None, dataset: Dataset, batch_size: int, device: torch.device,
                 cores: int) -> tuple[int, str]:
    """(workers, why): the explicit `num_workers`, else 0 for in-memory data, else min(cores, batch_size, 8) (the
    authors' rule, on the usable cores), half the cores when the CPU also trains."""
    if requested is not None:
        return requested, "num_workers"
    if in_memory(dataset):
        return 0, "in-memory dataset"
    share = cores if device.type != "cpu" else max(cores // 2, 1)
    return min(share, batch_size, 8), f"{cores} usable cores"


def mean_op_flops(model: nn.Module, example: torch.Tensor, batch_size: int) -> float:
    """A forward's FLOPs (matmuls, convolutions) per layer with a weight matrix, times the batch size: the size of
    a training step's typical operation."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(example)
    finally:
        model.train(was_training)
    layers = sum(1 for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and m.weight.dim() >= 2) or 1
    return counter.get_total_flops() / layers * batch_size / example.shape[0]


def intra_op_threads(cores: int, workers: int, device: torch.device, op_flops: float | None) -> tuple[int, str]:
    """(threads, why): `OMP_NUM_THREADS` when set; one for small ops on the CPU; else the cores the workers leave."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit), "OMP_NUM_THREADS"
    if device.type == "cpu" and op_flops is not None and op_flops < SMALL_OP_FLOPS:
        return 1, f"small ops, {op_flops / 1e6:.0f} MFLOP each"
    left = cores - workers if device.type == "cpu" else cores
    return max(left, 1), f"{cores} usable cores"


def choose(cfg: dict, dataset: Dataset, model: nn.Module, example: torch.Tensor,
           device: torch.device) -> dict[str, Any]:
    """Decide both counts, set the intra-op threads and return {'threads', 'workers', 'line'}, the line to log."""
    cores = cores_per_process()
    workers, why_workers = data_workers(cfg["num_workers"], dataset, cfg["batch_size"], device, cores)
    flops = mean_op_flops(model, example, cfg["batch_size"]) if device.type == "cpu" else None
    threads, why_threads = intra_op_threads(cores, workers, device, flops)
    torch.set_num_threads(threads)
    line = f"threads: {threads} intra-op ({why_threads}), {workers} data workers ({why_workers})"
    return {"threads": threads, "workers": workers, "line": line}
