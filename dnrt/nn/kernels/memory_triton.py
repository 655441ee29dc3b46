"""Triton kernel for ResponseMemory's update on CUDA: the sequential definition itself, one class per program.

Each program owns one class and a block of feature columns. It walks the whole batch in order, reading
each target, and updates its class's running mean (kept in registers) at that class's samples, writing
each such sample's mean: right after its own update (reference order) or the one before the batch (paper
order). One launch for the means and one scatter-add for the counts, no sort and no host-device
synchronisation, so CUDA graphs can capture it. Fused multiply-adds are off, so that every value equals the
float32 recurrence computed one operation at a time, as the CPU kernel and PyTorch's elementwise ops do.
Written by hand because no PyTorch op walks segments in order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 256


@triton.jit
def _walk_kernel(x_ptr, targets_ptr, count_ptr, mean_ptr, out_ptr, batch, d, keep, take,
                 REFERENCE: tl.constexpr, BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    row = mean_ptr + k.to(tl.int64) * d + cols
    fresh = tl.load(count_ptr + k) == 0
    before = tl.load(row, mask=mask, other=0.0)
    mean = before
    first = fresh
    x_row, out_row = x_ptr + cols, out_ptr + cols
    for i in range(0, batch):
        hit = tl.load(targets_ptr + i) == k
        x = tl.load(x_row, mask=mask & hit, other=0.0)
        updated = tl.where(first, x, keep * mean + take * x)
        if REFERENCE:
            tl.store(out_row, updated, mask=mask & hit)
        else:
            tl.store(out_row, tl.where(fresh, x, before), mask=mask & hit)
        mean = tl.where(hit, updated, mean)
        first = first & (hit == 0)
        x_row += d
        out_row += d
    tl.store(row, mean, mask=mask)


def memory_update(mean: torch.Tensor, count: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float,
                  reference: bool) -> torch.Tensor:
    """``dnrt::memory_update`` for float32 tensors on one CUDA device (see ``memory_op``)."""
    if not mean.is_contiguous():
        raise ValueError("dnrt::memory_update: the mean buffer must be contiguous")
    num_classes, d = mean.shape
    x, targets = x.contiguous(), targets.contiguous()
    out = torch.empty_like(x)
    grid = (num_classes, triton.cdiv(d, BLOCK_D))
    _walk_kernel[grid](x, targets, count, mean, out, x.shape[0], d, 1.0 - momentum, momentum,
                       REFERENCE=reference, BLOCK_D=BLOCK_D, num_warps=2, enable_fp_fusion=False)
    count.scatter_add_(0, targets, torch.ones_like(targets))  # asserts on the device where a target is out of range
    return out
