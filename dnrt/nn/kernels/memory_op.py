"""ResponseMemory's update as one registered op, ``torch.ops.dnrt.memory_update`` (docs/method.md §3, §4).

``memory_update(mean, count, x, targets, momentum, reference)`` runs the sequential definition in one pass:
samples in batch order, the first sample of a class never seen sets its mean, later ones do
``μ ← (1 − m)·μ + m·x``. It updates ``mean [K, d]`` and ``count [K]`` in place and returns, per sample,
the mean right after its own update (``reference=True``) or the mean before the batch, the sample itself
where its class was never seen (``reference=False``, the paper's order).

Kernels: C++ on the CPU (``memory_cpu.cpp``, float32 and float64, registered from C++ for the dispatcher's
CPU key, so an eager call costs no Python), Triton on CUDA (``memory_triton.py``, float32), neither with a
host synchronisation. Elsewhere, or where the C++ kernel does not build, ``sequential_update`` runs: the
definition as a Python loop over samples, exact and slow, reading the targets on the host. A fake
implementation lets ``torch.compile`` trace the op as one node and ``torch.export`` keep it. Defined with
``torch.library.Library`` rather than ``custom_op``, whose Python layers would cost more than the kernel.
"""
from __future__ import annotations

import torch

from . import triton_module
from .build import load_cpp

SCHEMA = ("memory_update(Tensor(a!) mean, Tensor(b!) count, Tensor x, Tensor targets, float momentum, "
          "bool reference) -> Tensor")

_lib = torch.library.Library("dnrt", "FRAGMENT")
_lib.define(SCHEMA)


def cpu_available() -> bool:
    """Whether the C++ kernel is loaded; the first call builds it (a warning says why a build failed)."""
    return load_cpp("memory_cpu.cpp", "CPU memory kernel", "using a sequential loop instead")


def sequential_update(mean: torch.Tensor, count: torch.Tensor, x: torch.Tensor, targets: torch.Tensor,
                      momentum: float, reference: bool) -> torch.Tensor:
    """The definition as a loop over samples, in the memory's dtype: the fallback, and what the kernels equal."""
    labels, counts = targets.tolist(), count.tolist()
    bad = [k for k in labels if not 0 <= k < len(counts)]
    if bad:
        raise IndexError(f"dnrt::memory_update: target {bad[0]} is outside [0, {len(counts) - 1}]")
    if reference:
        out = x.new_empty(x.shape)
    else:
        fresh = (count == 0).index_select(0, targets).unsqueeze(1)
        out = torch.where(fresh, x, mean.index_select(0, targets)).contiguous()
    for i, k in enumerate(labels):
        mean[k] = x[i] if counts[k] == 0 else (1 - momentum) * mean[k] + momentum * x[i]
        counts[k] += 1
        if reference:
            out[i] = mean[k]
    count.copy_(torch.tensor(counts, dtype=count.dtype))
    return out


def _default(mean, count, x, targets, momentum, reference):
    """Every device without a kernel of its own. On the CPU, the first call builds the C++ kernel, which
    then takes the CPU key for this and every later call."""
    if mean.device.type == "cpu" and mean.dtype in (torch.float32, torch.float64) and cpu_available():
        if torch._C._dispatch_has_kernel_for_dispatch_key("dnrt::memory_update", "CPU"):  # loaded: it runs from now
            return torch.ops.dnrt.memory_update(mean, count, x, targets, momentum, reference)
    return sequential_update(mean, count, x, targets, momentum, reference)


def _cuda(mean, count, x, targets, momentum, reference):
    triton = triton_module("memory_triton")
    if triton is not None and mean.dtype == torch.float32:
        return triton.memory_update(mean, count, x, targets, momentum, reference)
    return sequential_update(mean, count, x, targets, momentum, reference)


def _fake(mean, count, x, targets, momentum, reference):
    return x.new_empty(x.shape)


_lib.impl("memory_update", _default, "CompositeExplicitAutograd")
_lib.impl("memory_update", _cuda, "CUDA")
torch.library.register_fake("dnrt::memory_update", _fake, lib=_lib)
