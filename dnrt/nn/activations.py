"""Every activation of the paper's tables by name (``make_activation``), and the GDN baseline."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..errors import DNRTError
from .raa import RAA


class GDN(nn.Module):
    """Generalised divisive normalisation (Ballé et al. 2016): ``y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²)``.

    ``β`` and ``γ`` stay positive through a squared, lower-bounded parametrisation (as in Ballé's code):
    the stored values are square roots, offset by a tiny pedestal so that zero entries still get gradients.
    """

    _pedestal = 2.0 ** -36

    def __init__(self, num_features: int, channel_dim: int = -1, beta_min: float = 1e-6,
                 gamma_init: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.channel_dim, self.beta_min = num_features, channel_dim, beta_min
        self.beta_sqrt = nn.Parameter(torch.full((num_features,), (1.0 + self._pedestal) ** 0.5))
        self.gamma_sqrt = nn.Parameter((gamma_init * torch.eye(num_features) + self._pedestal) ** 0.5)

    @property
    def beta(self) -> torch.Tensor:
        floor = (self.beta_min + self._pedestal) ** 0.5
        return self.beta_sqrt.clamp(min=floor).square() - self._pedestal

    @property
    def gamma(self) -> torch.Tensor:
        return self.gamma_sqrt.clamp(min=self._pedestal ** 0.5).square() - self._pedestal

    def extra_repr(self) -> str:
        return f"{self.num_features}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[self.channel_dim] != self.num_features:
            raise DNRTError(f"GDN({self.num_features}) got input of shape {tuple(x.shape)} "
                            f"along dim {self.channel_dim}")
        moved = x.movedim(self.channel_dim, -1)
        norm = torch.sqrt(moved.square() @ self.gamma.to(x.dtype).t() + self.beta.to(x.dtype))
        return (moved / norm).movedim(-1, self.channel_dim)


def _needs_width(name: str, build: Callable[[int, int], nn.Module]) -> Callable[[Optional[int], int], nn.Module]:
    def make(num_features: Optional[int], channel_dim: int) -> nn.Module:
        if num_features is None:
            raise DNRTError(f"activation {name!r} has parameters: pass num_features")
        return build(num_features, channel_dim)
    return make


ACTIVATIONS: Dict[str, Callable[[Optional[int], int], nn.Module]] = {
    "relu": lambda n, c: nn.ReLU(),
    "gelu": lambda n, c: nn.GELU(),
    "softplus": lambda n, c: nn.Softplus(),
    "elu": lambda n, c: nn.ELU(),
    "selu": lambda n, c: nn.SELU(),
    "silu": lambda n, c: nn.SiLU(),
    "gdn": _needs_width("gdn", lambda n, c: GDN(n, channel_dim=c)),
    "raa": _needs_width("raa", lambda n, c: RAA(n, base="gelu", channel_dim=c)),
    "raa_relu": _needs_width("raa_relu", lambda n, c: RAA(n, base="relu", channel_dim=c)),
}


def unknown_name(kind: str, name: object, known) -> DNRTError:
    """The error for a name missing from a registry: it lists the closest and all known names."""
    close = difflib.get_close_matches(str(name), list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return DNRTError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


def make_activation(name: str, num_features: Optional[int] = None, channel_dim: int = -1) -> nn.Module:
    """Build an activation by name; ``raa``, ``raa_relu`` and ``gdn`` need ``num_features``."""
    if name not in ACTIVATIONS:
        raise unknown_name("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name](num_features, channel_dim)
