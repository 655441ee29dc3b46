"""Per-class running means of a layer's aggregated responses (ARR's memory, docs/method.md §3, §4).

The update is the sequential definition itself — samples in batch order, the first sample of a class
sets its mean, later ones do ``μ ← (1 − m)μ + m·x`` — run in one pass over the batch by the registered op
``torch.ops.dnrt.memory_update`` (``dnrt.nn.kernels.memory_op``: C++ on the CPU, Triton on CUDA, neither
with a host synchronisation), so it equals the recurrence in the memory's dtype for any batch and momentum
and ``torch.compile`` traces it as one node.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DNRTError
from .kernels import memory_op  # noqa: F401  (registers torch.ops.dnrt.memory_update)

ORDERS = ("reference", "paper")


def _check_inputs(responses: torch.Tensor, targets: torch.Tensor, num_features: int) -> None:
    if responses.dim() != 2 or responses.shape[1] != num_features:
        raise DNRTError(f"ResponseMemory expects responses of shape [B, {num_features}], got {tuple(responses.shape)}")
    if targets.dim() != 1 or targets.shape[0] != responses.shape[0]:
        raise DNRTError(f"ResponseMemory expects targets of shape [{responses.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise DNRTError(f"ResponseMemory expects integer class targets, got dtype {targets.dtype}")


def _range_error(targets: torch.Tensor, num_classes: int) -> DNRTError:
    """The error for targets outside ``[0, K)``, which the kernels refuse (on CUDA by a device-side assert)."""
    low, high = (int(v) for v in targets.aminmax())
    return DNRTError(f"targets must lie in [0, {num_classes - 1}], got values in [{low}, {high}]")


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

    def forward(self, responses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.means(responses, targets, update=self.training)

    def means(self, responses: torch.Tensor, targets: torch.Tensor, update: bool) -> torch.Tensor:
        """The means the samples are regularised towards (detached), updating the memory where ``update``."""
        _check_inputs(responses, targets, self.num_features)
        mean = self.mean
        if mean.dtype not in (torch.float32, torch.float64):
            raise DNRTError(f"ResponseMemory keeps its means in float32 or float64, not {mean.dtype}")
        x = responses.detach()
        if x.dtype != mean.dtype:
            x = x.to(mean.dtype)
        targets = targets.to(device=x.device, dtype=torch.long)
        try:
            if not update:
                return self._before(x, targets)
            if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                return self._update_all(x, targets)
            return torch.ops.dnrt.memory_update(mean, self.count, x, targets, self.momentum, self.order == "reference")
        except IndexError:
            raise _range_error(targets, self.num_classes) from None

    def _update_all(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Update with every process's batch (gathered in rank order); return this process's means."""
        rank, n = dist.get_rank(), x.shape[0]
        out = torch.ops.dnrt.memory_update(self.mean, self.count, _all_gather(x), _all_gather(targets), self.momentum,
                                           self.order == "reference")
        return out[rank * n:(rank + 1) * n]

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
