"""Triton kernel for ResponseMemory's update on CUDA: the sequential definition itself, one class per program.

Each program owns one class and a block of feature columns and walks that class's samples in batch order,
keeping the running mean in registers and writing each sample's mean right after its own update. The
batch order comes from one stable sort and the class offsets from a scatter-add and a cumulative sum, so
the whole update is a handful of launches with no host-device synchronisation, where the doubling scan
takes about fifty. Written by hand because no PyTorch op walks segments in order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 256


@triton.jit
def _walk_kernel(x_ptr, order_ptr, start_ptr, count_ptr, seen_ptr, mean_ptr, out_ptr, final_ptr, d, momentum,
                 BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    start = tl.load(start_ptr + k)
    n = tl.load(count_ptr + k)
    new = tl.load(seen_ptr + k) == 0
    mean = tl.load(mean_ptr + k.to(tl.int64) * d + cols, mask=mask, other=0.0)
    for i in range(0, n):
        row = tl.load(order_ptr + start + i).to(tl.int64)
        x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0)
        mean = tl.where(new & (i == 0), x, mean + momentum * (x - mean))
        tl.store(out_ptr + row * d + cols, mean, mask=mask)
    tl.store(final_ptr + k.to(tl.int64) * d + cols, mean, mask=mask)


def sequential_means(mean0: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float):
    """Same contract as ``dnrt.nn.memory.sequential_means``, for float32 tensors on one CUDA device."""
    num_classes, d = mean0.shape
    x = x.contiguous()
    _, order = torch.sort(targets, stable=True)
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    counts.scatter_add_(0, targets, torch.ones_like(targets))
    starts = torch.cumsum(counts, 0) - counts
    after, final = torch.empty_like(x), torch.empty_like(mean0)
    grid = (num_classes, triton.cdiv(d, BLOCK_D))
    _walk_kernel[grid](x, order, starts, counts, seen.to(torch.int8), mean0, after, final, d, momentum,
                       BLOCK_D=BLOCK_D, num_warps=2)
    return after, torch.arange(num_classes, device=x.device), final
