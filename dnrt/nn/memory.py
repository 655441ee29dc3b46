"""Per-class running means of a layer's aggregated responses (ARR's memory, SPEC §2), updated without loops.

The sequential definition — samples update ``μ_k`` one at a time in batch order, the first sample of a
class sets it, later ones do ``μ ← (1 − m)μ + m·x`` — is a per-class linear recurrence. It is computed
here for a whole batch at once by sorting samples by class and running a parallel prefix scan
(log₂ B doubling steps, each one multiply-add of the batch with itself shifted) over the sorted batch: every sample gets the mean
right after its own update, with no Python loop over samples and no host-device synchronisation.
The scan's coefficients are products of ``(1 − m)``, kept in float64 so that powers like ``0.999⁴⁰⁹⁶`` do
not inherit float32's rounding of ``m``; they only shrink, so the scan is stable for any batch size and
any momentum in (0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DNRTError

ORDERS = ("reference", "paper")


def _check_inputs(responses: torch.Tensor, targets: torch.Tensor, num_classes: int, num_features: int) -> None:
    if responses.dim() != 2 or responses.shape[1] != num_features:
        raise DNRTError(f"ResponseMemory expects responses of shape [B, {num_features}], got {tuple(responses.shape)}")
    if targets.dim() != 1 or targets.shape[0] != responses.shape[0]:
        raise DNRTError(f"ResponseMemory expects targets of shape [{responses.shape[0]}], got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise DNRTError(f"ResponseMemory expects integer class targets, got dtype {targets.dtype}")
    if not torch.compiler.is_compiling() and targets.numel() and not targets.is_cuda:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise DNRTError(f"targets must lie in [0, {num_classes - 1}], got values in [{low}, {high}]")


def sequential_means(mean0: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, ys: torch.Tensor, momentum: float):
    """Each sample's class mean right after its own update, for a batch already sorted by class.

    ``mean0[K, d]`` and ``seen[K]`` (bool) are the memory before the batch. Returns ``[B, d]``.
    The scan needs log₂ of the longest run of one class: read on the host for CPU tensors (no device to
    wait for), bounded by the batch size on accelerators (no synchronisation).
    """
    n = ys.shape[0]
    longest = int(torch.bincount(ys).max()) if ys.device.type == "cpu" and n else n
    pos = torch.arange(n, device=ys.device)
    start = torch.full_like(seen, n, dtype=torch.long).scatter_reduce(0, ys, pos, "amin")
    rank = pos - start[ys]
    first_of_new = (rank == 0) & ~seen[ys]
    decay = torch.full((n,), 1.0 - momentum, dtype=torch.float64, device=x.device).masked_fill(first_of_new, 0.0)
    value = x * _column(torch.where(first_of_new, 1.0, momentum), x)
    spare = torch.empty_like(value)
    for step in range(math.ceil(math.log2(longest)) if longest > 1 else 0):
        offset = 1 << step
        linked = rank[offset:] >= offset
        spare[:offset] = value[:offset]
        torch.add(value[offset:], value[:-offset] * _column(decay[offset:] * linked, x), out=spare[offset:])
        decay = torch.cat([decay[:offset], torch.where(linked, decay[offset:] * decay[:-offset], decay[offset:])])
        value, spare = spare, value
    return value + mean0.index_select(0, ys) * _column(decay, x)


def _column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample factor as a [B, 1] column of ``like``'s dtype (a broadcast multiply is the fast path)."""
    return t.to(like.dtype).unsqueeze(1)


class ResponseMemory(nn.Module):
    """Running mean of a layer's aggregated response for each class (buffers ``mean [K, d]``, ``count [K]``).

    ``memory(responses, targets)`` returns, for every sample, the mean it is regularised towards
    (detached). ``order="reference"`` (the authors' code, default): the mean right after the sample's own
    sequential update. ``order="paper"`` (Eq. 4): the mean before the batch (the sample itself where its
    class was never seen). In training mode the memory is updated; in eval mode it is only read.
    With ``sync=True`` under ``torch.distributed`` the responses and targets of all processes are gathered
    (rank order) before the update, so every process holds the same memory; each process requires
    the same batch size.
    """

    def __init__(self, num_classes: int, num_features: int, momentum: float = 0.1, order: str = "reference", sync: bool = True) -> None:
        super().__init__()
        if order not in ORDERS:
            raise DNRTError(f"unknown ARR order {order!r}; known: {', '.join(ORDERS)}")
        if not 0.0 < momentum <= 1.0:
            raise DNRTError(f"ARR momentum must lie in (0, 1], got {momentum}")
        self.num_classes, self.num_features = num_classes, num_features
        self.momentum, self.order, self.sync = momentum, order, sync
        self.register_buffer("mean", torch.zeros(num_classes, num_features))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_classes}, {self.num_features}, momentum={self.momentum}, order={self.order!r}"

    @torch.no_grad()
    def forward(self, responses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_inputs(responses, targets, self.num_classes, self.num_features)
        x = responses.detach().to(self.mean.dtype)
        targets = targets.to(device=x.device, dtype=torch.long)
        if not self.training:
            return self._before(x, targets)
        local = slice(None)
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            local = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
            x, targets = _all_gather(x), _all_gather(targets)
        ys, order = torch.sort(targets, stable=True)
        after = sequential_means(self.mean, self.count > 0, x.index_select(0, order), ys, self.momentum)
        if self.order == "reference":
            unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
            result = after.index_select(0, unsort)
        else:
            result = self._before(x, targets)
        self._store(after, ys)
        return result[local]

    def _before(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each sample's class mean as it stands, or the sample itself where its class was never seen
        (an unseen class's mean is still all zeros, so a sum picks the right one without a select)."""
        return self.mean.index_select(0, targets) + x * _column(self.count.index_select(0, targets) == 0, x)

    def _store(self, after: torch.Tensor, ys: torch.Tensor) -> None:
        """Keep each class's mean after its last sample of the batch, and count the samples."""
        pos = torch.arange(ys.shape[0], device=ys.device)
        last = torch.full_like(self.count, -1).scatter_reduce(0, ys, pos, "amax")
        present = _column(last >= 0, self.mean)
        self.mean.mul_(1 - present).add_(after.index_select(0, last.clamp(min=0)).mul_(present))
        self.count.scatter_add_(0, ys, torch.ones_like(ys))


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every process in rank order."""
    out = t.new_empty((dist.get_world_size() * t.shape[0],) + tuple(t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, t.contiguous())
    return out
