"""Per-class running means of a layer's aggregated responses (ARR's memory, SPEC §2), updated without loops.

The sequential definition — samples update ``μ_k`` one at a time in batch order, the first sample of a
class sets it, later ones do ``μ ← (1 − m)μ + m·x`` — is a per-class linear recurrence, computed here for a
whole batch at once, so every sample gets the mean right after its own update with no Python loop over
samples. On the CPU the batch is laid out rank-major and each rank (the r-th sample of every class) is one
vectorised step; on CUDA a Triton kernel walks each class's samples in order, one program per class;
elsewhere a parallel prefix scan over the batch sorted by class. Neither of the last two synchronises
with the host. The scan's coefficients are products of ``(1 − m)``, kept in float64 so that powers like
``0.999⁴⁰⁹⁶`` do not inherit float32's rounding of ``m`` (on MPS, which has no float64, they are float32
and long runs of one class are less exact); they only shrink, so the scan is stable for any batch size
and any momentum in (0, 1].
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import DNRTError
from . import kernels

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


RANK_LOOP_MAX_RUN = 64
"""Longest run of one class for which the CPU uses the rank loop (one op per rank) over the scan."""


def sequential_means(mean0: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float):
    """Each sample's class mean right after its own sequential update, and each present class's final mean.

    ``mean0[K, d]`` and ``seen[K]`` (bool) are the memory before the batch. Returns ``(after [B, d], classes,
    final [len(classes), d])``. On the CPU, where reading a count costs nothing, short class runs take the
    rank loop; float32 on CUDA takes the Triton kernel; otherwise the doubling scan. The last two need no
    host-device synchronisation.
    """
    triton = kernels.triton_module("memory_triton") if x.is_cuda and x.dtype == torch.float32 else None
    if triton is not None:
        return triton.sequential_means(mean0, seen, x, targets, momentum)
    if x.device.type == "cpu" and targets.numel():
        labels = targets.numpy()
        counts = np.bincount(labels, minlength=seen.shape[0])
        if counts.max() <= RANK_LOOP_MAX_RUN:
            return _rank_loop(mean0, seen, x, labels, counts, momentum)
    return _doubling_scan(mean0, seen, x, targets, momentum)


def _rank_loop(mean0: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, targets: np.ndarray, counts: np.ndarray,
               momentum: float):
    """The recurrence one rank at a time. With the rows laid out rank-major and the classes ordered by count,
    the r-th samples of all classes form one contiguous block right after their predecessors' block, so
    each rank is one in-place ``lerp`` of two slices: about three passes over the batch in all. The index
    bookkeeping is done in NumPy, where a few hundred integers cost less than a PyTorch op's dispatch."""
    classes = np.argsort(-counts, kind="stable")
    sizes = counts[classes]
    present = int(np.count_nonzero(sizes))
    per_rank = (sizes[:present] > np.arange(sizes[0])[:, None]).sum(1)
    offsets = np.cumsum(per_rank) - per_rank
    order = np.argsort(targets, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(targets)) - (np.cumsum(counts) - counts)[targets[order]]
    slot = np.empty_like(classes)
    slot[classes] = np.arange(len(classes))
    row = offsets[rank] + slot[targets]
    inverse = np.empty_like(row)
    inverse[row] = np.arange(len(row))
    out = x.index_select(0, torch.from_numpy(inverse))
    first = classes[:present]
    prior, weight = mean0.index_select(0, torch.from_numpy(first)), momentum
    new = ~seen.numpy()[first]
    if new.any():  # an unseen class's first sample sets its mean: lerp from 0 with weight 1
        mask = torch.from_numpy(new).unsqueeze(1)
        prior.masked_fill_(mask, 0)
        weight = torch.full((present, 1), momentum, dtype=x.dtype).masked_fill_(mask, 1)
    torch.lerp(prior, out[:present], weight, out=out[:present])
    for prev, start, n in zip(offsets.tolist(), offsets[1:].tolist(), per_rank[1:].tolist()):
        torch.lerp(out[prev:prev + n], out[start:start + n], momentum, out=out[start:start + n])
    last = torch.from_numpy(offsets[sizes[:present] - 1] + np.arange(present))
    return out.index_select(0, torch.from_numpy(row)), torch.from_numpy(first), out.index_select(0, last)


def _doubling_scan(mean0: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, momentum: float):
    """The recurrence as a parallel prefix scan over the batch sorted by class: log₂ B doubling steps, each
    one multiply-add of the batch with itself shifted (log₂ of the longest run on the CPU)."""
    ys, order = torch.sort(targets, stable=True)
    sorted_x = x.index_select(0, order)
    n = ys.shape[0]
    longest = int(torch.bincount(ys).max()) if ys.device.type == "cpu" and n else n
    pos = torch.arange(n, device=ys.device)
    start = torch.full_like(seen, n, dtype=torch.long).scatter_reduce(0, ys, pos, "amin")
    rank = pos - start[ys]
    first_of_new = (rank == 0) & ~seen[ys]
    coefficient = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    decay = torch.full((n,), 1.0 - momentum, dtype=coefficient, device=x.device).masked_fill(first_of_new, 0.0)
    weight = torch.full((n, 1), momentum, dtype=x.dtype, device=x.device).masked_fill_(first_of_new[:, None], 1)
    value = sorted_x * weight
    spare = torch.empty_like(value)
    for step in range(math.ceil(math.log2(longest)) if longest > 1 else 0):
        offset = 1 << step
        linked = rank[offset:] >= offset
        spare[:offset] = value[:offset]
        torch.add(value[offset:], value[:-offset] * _column(decay[offset:] * linked, x), out=spare[offset:])
        decay = torch.cat([decay[:offset], torch.where(linked, decay[offset:] * decay[:-offset], decay[offset:])])
        value, spare = spare, value
    after = value + torch.where(seen[ys, None], mean0.index_select(0, ys), 0) * _column(decay, x)
    last = torch.full_like(seen, -1, dtype=torch.long).scatter_reduce(0, ys, pos, "amax")
    final = torch.where((last >= 0).unsqueeze(1), after.index_select(0, last.clamp(min=0)), mean0)
    unsort = torch.empty_like(order).scatter_(0, order, pos)
    return after.index_select(0, unsort), torch.arange(seen.shape[0], device=x.device), final


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

    def __init__(self, num_classes: int, num_features: int, momentum: float = 0.1, order: str = "reference",
                 sync: bool = True) -> None:
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
        if not x.shape[0]:
            return x[local].clone()
        after, classes, final = sequential_means(self.mean, self.count > 0, x, targets, self.momentum)
        result = after if self.order == "reference" else self._before(x, targets)
        self.mean.index_copy_(0, classes, final)
        self.count.scatter_add_(0, targets, torch.ones_like(targets))
        return result[local]

    def _before(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each sample's class mean as it stands, or the sample itself where its class was never seen."""
        unseen = (self.count.index_select(0, targets) == 0).unsqueeze(1)
        return torch.where(unseen, x, self.mean.index_select(0, targets))


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every process in rank order."""
    out = t.new_empty((dist.get_world_size() * t.shape[0],) + tuple(t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, t.contiguous())
    return out
