"""The authors' RAA and ARR, as baselines: written here from what their code computes (``qtcls/modules/DNRT/raa.py``,
``arr_memory.py`` and the ViT blocks of github.com/horrible-dong/DNRT), so that every ratio is against what they run."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import dnrt


class AuthorsRAA(nn.Module):
    """The authors' RAA module: ``x·Φ(x + s)`` with the shift ``s = wᵀx + b`` from a one-output linear layer,
    all in plain autograd (every intermediate kept); for NCHW maps it permutes to NHWC and back."""

    def __init__(self, num_features: int, channels_first: bool = False) -> None:
        super().__init__()
        self.channels_first = channels_first
        self.weight = nn.Parameter(torch.zeros(1, num_features))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        shift = F.linear(x, self.weight, self.bias)
        y = x * (0.5 * (1 + torch.erf((x + shift) / math.sqrt(2))))
        return y.permute(0, 3, 1, 2) if self.channels_first else y

    @classmethod
    def like(cls, raa: dnrt.RAA) -> "AuthorsRAA":
        """The authors' module with ``raa``'s parameters (GELU base and vector shift, the only form they time)."""
        if raa.base != "gelu" or raa.shift != "vector" or raa.channel_dim not in (1, -1):
            raise ValueError(f"the authors' RAA has a GELU base and a vector shift, not {raa}")
        module = cls(raa.num_features, channels_first=raa.channel_dim == 1)
        with torch.no_grad():
            module.weight.copy_(raa.weight.reshape(1, -1))
            module.bias.copy_(raa.bias.reshape(1))
        return module.to(raa.weight.device)


def to_authors_raa(model: nn.Module) -> nn.Module:
    """Replace every ``dnrt.RAA`` of ``model`` by ``AuthorsRAA.like`` it (in place; also returned)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, dnrt.RAA):
                setattr(parent, name, AuthorsRAA.like(child))
    return model


class AuthorsMemory:
    """The authors' per-class running means (their ``ClassWiseResponseMemory.update``): the batch's responses go
    to NumPy once, then a Python loop over the samples in batch order sets (first sample of a class) or blends
    (``(1 − m)μ + m·r``, a new NumPy row) its class's mean and collects it; the collected rows are stacked and
    sent back to the responses' device. (Float32 first, since NumPy has no bfloat16.)"""

    def __init__(self, num_classes: int, momentum: float = 0.1) -> None:
        self.momentum = momentum
        self.means: List[Optional[np.ndarray]] = [None] * num_classes
        self.counts = [0] * num_classes

    def update(self, responses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each sample's class mean right after its own update, ``[B, d]`` on ``responses``' device."""
        rows = responses.detach().float().cpu().numpy()
        collected = []
        for row, k in zip(rows, targets.tolist()):
            if self.counts[k] == 0:
                self.means[k] = row
            else:
                self.means[k] = (1 - self.momentum) * self.means[k] + self.momentum * row
            self.counts[k] += 1
            collected.append(self.means[k])
        return torch.from_numpy(np.stack(collected)).to(responses.device)


class AuthorsARR:
    """The authors' ARR on ``layers`` of ``model``: each layer's response (class token of a token sequence, as
    their ViT takes; global average pool of a map) updates that layer's own ``AuthorsMemory``; the loss is the L1
    distance of the responses to their means, responses of one width side by side, averaged over the widths."""

    def __init__(self, model: nn.Module, num_classes: int, weight: float = 1.0, momentum: float = 0.1) -> None:
        self.num_classes, self.weight, self.momentum = num_classes, weight, momentum
        self.layers = dnrt.find_layers(model)
        modules = dict(model.named_modules())
        self.memories: Dict[str, AuthorsMemory] = {}
        self.responses: Dict[str, torch.Tensor] = {}
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module: nn.Module, args, output: torch.Tensor) -> None:
            self.responses[name] = output[:, 0] if output.dim() == 3 else output.mean(dim=(2, 3))
        return record

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        by_width: Dict[int, tuple] = {}
        for name in self.layers:
            r = self.responses[name]
            memory = self.memories.setdefault(name, AuthorsMemory(self.num_classes, self.momentum))
            rs, ms = by_width.setdefault(r.shape[1], ([], []))
            rs.append(r)
            ms.append(memory.update(r, targets))
        total = sum(F.l1_loss(torch.cat(rs).float(), torch.cat(ms)) for rs, ms in by_width.values())
        return self.weight * total / len(by_width)
