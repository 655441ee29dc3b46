"""Response-Adaptive Activation (docs/method.md §1): ``x · Φ(x + s)`` or ``max(0, x + s)``, ``s = wᵀx + b``.

The module checks its input and its saved kind; ``dnrt.nn.kernels.raa`` computes it (hand-written kernels
where they apply, else the plain math through a memory-efficient autograd Function that keeps only ``x``
and the per-vector shift ``s``). The d×d ablation form runs by plain autograd here.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from ..errors import DNRTError
from . import kernels

BASES = ("gelu", "relu")
SHIFTS = ("vector", "scalar", "elementwise")
_SQRT_HALF = math.sqrt(0.5)


class RAA(nn.Module):
    """Response-Adaptive Activation: a learnable, input-dependent firing condition (DNRT, ICLR 2024).

    ``base="gelu"``: ``x · Φ(x + s)``; ``base="relu"``: ``max(0, x + s)``. ``shift="vector"``: ``s = wᵀx + b``
    per feature vector (the paper's form); ``"scalar"``: one learned constant; ``"elementwise"``:
    ``s = Wx + b`` with a d×d ``W`` (an ablation). Feature vectors lie along ``channel_dim`` (-1 for
    tokens, 1 for NCHW maps). Every parameter starts at zero, so a fresh RAA is exactly GELU (or ReLU).
    Its state holds its kind (buffer ``kind``: base, shift, channel_dim), so a state of another kind is refused.
    """

    def __init__(self, num_features: int, base: str = "gelu", shift: str = "vector", channel_dim: int = -1) -> None:
        super().__init__()
        if base not in BASES:
            raise DNRTError(f"unknown RAA base {base!r}; known: {', '.join(BASES)}")
        if shift not in SHIFTS:
            raise DNRTError(f"unknown RAA shift {shift!r}; known: {', '.join(SHIFTS)}")
        if not isinstance(num_features, int) or num_features < 1:
            raise DNRTError(f"RAA needs a positive integer num_features, got {num_features!r}")
        self.num_features, self.base, self.shift, self.channel_dim = num_features, base, shift, channel_dim
        self.bias = nn.Parameter(torch.zeros(num_features if shift == "elementwise" else 1))  # never 0-d: FSDP2
        if shift == "vector":
            self.weight = nn.Parameter(torch.zeros(num_features))
        elif shift == "elementwise":
            self.weight = nn.Parameter(torch.zeros(num_features, num_features))
        else:
            self.register_parameter("weight", None)
        self.register_buffer("kind", torch.tensor([BASES.index(base), SHIFTS.index(shift), channel_dim]))

    def extra_repr(self) -> str:
        return f"{self.num_features}, base={self.base!r}, shift={self.shift!r}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[self.channel_dim] != self.num_features:
            raise DNRTError(
                f"RAA({self.num_features}) expects {self.num_features} features along dim {self.channel_dim}, "
                f"got input of shape ({', '.join([str(n) for n in x.shape])})"  # scriptable
            )
        dim = self.channel_dim if self.channel_dim < 0 else self.channel_dim - x.dim()
        if torch.jit.is_scripting():
            return raa_formula(x, self.weight, self.bias, dim, self.base, self.shift)
        return self._eager(x, dim)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The memory-efficient Function, or the plain formula where a tracer or exporter records the graph
        (a graph cannot hold a Python autograd Function), as timm's memory-efficient activations do."""
        if self.shift == "elementwise":
            return _elementwise_shift(x, self.weight, self.bias, dim, self.base)
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            return raa_formula(x, self.weight, self.bias, dim, self.base, self.shift)
        return kernels.raa(x, self.weight, self.bias, dim, self.base)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse the state of an RAA of another kind; accept, with a warning, one saved before RAA kept its kind,
        and a 0-d bias as older dnrt saved it (now of shape (1,), as FSDP2 shards no 0-d parameter)."""
        key, name = prefix + "kind", prefix.rstrip(".") or "RAA"
        if key in state_dict:
            _check_kind(state_dict[key], self.kind, name)
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor) and bias.dim() == 0 and self.bias.shape == (1,):
            state_dict[prefix + "bias"] = bias.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in missing_keys:
            missing_keys.remove(key)
        if key not in state_dict and prefix + "bias" in state_dict:
            warnings.warn(f"dnrt: {name}: the saved RAA state does not say its kind (saved by an older dnrt); "
                          f"loaded as {_describe(self.kind)} unchecked")


class LazyRAA(LazyModuleMixin, RAA):
    """An RAA whose width and channel layout come from its first input, so a model config can name it
    (``timm.create_model(name, act_layer=dnrt.LazyRAA)``); it becomes an ``RAA`` on that first call.

    Feature vectors lie last for tokens (inputs of up to 3 dims) and along dim 1 for maps (4 dims or more),
    unless ``channel_dim`` is given (a map whose channels lie last, as in ConvNeXt's MLP, needs
    ``channel_dim=-1``). ``base`` and ``shift`` as for ``RAA``; ``inplace`` is accepted for timm's
    ``act_layer(inplace=...)`` and ignored (RAA keeps its input for backward). A state saved from an RAA
    or a materialised LazyRAA loads before the first call, its kind fixing the layout.
    """

    cls_to_become = RAA
    weight: Optional[UninitializedParameter]
    bias: nn.Parameter

    def __init__(self, base: str = "gelu", shift: str = "vector", channel_dim: Optional[int] = None,
                 inplace: bool = False, device=None, dtype=None) -> None:
        super().__init__(1, base=base, shift=shift, channel_dim=-1 if channel_dim is None else channel_dim)
        self.num_features, self.channel_dim = 0, channel_dim
        factory = {"device": device, "dtype": dtype}
        if shift != "scalar":
            self.weight = UninitializedParameter(**factory)
        self.bias = UninitializedParameter(**factory) if shift == "elementwise" else nn.Parameter(
            torch.zeros(1, **factory))
        self.kind = UninitializedBuffer(device=device, dtype=torch.long)

    def initialize_parameters(self, x: torch.Tensor) -> None:
        """Size the parameters from the first input (all zeros, so the module starts as its base)."""
        if self.num_features and not self.has_uninitialized_params():
            return
        if x.dim() == 0:
            raise DNRTError("LazyRAA needs an input of at least one dimension, got a 0-d tensor")
        if is_lazy(self.kind):
            self._materialize(x.shape[self._layout(x)], self._layout(x))
        elif not self.num_features:  # a loaded scalar-shift state says its layout, not its width
            self.num_features = x.shape[self.channel_dim]

    def _layout(self, x: torch.Tensor) -> int:
        if self.channel_dim is not None:
            return self.channel_dim
        return 1 if x.dim() >= 4 else -1

    def _materialize(self, width: int, channel_dim: int) -> None:
        self.num_features, self.channel_dim = width, channel_dim
        if self.shift == "vector":
            self.weight.materialize((width,))
        elif self.shift == "elementwise":
            self.weight.materialize((width, width))
            self.bias.materialize((width,))
        self.kind.materialize((3,))
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            self.kind.copy_(torch.tensor([BASES.index(self.base), SHIFTS.index(self.shift), channel_dim]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Before the first call, a saved state fixes the width (from its weight) and the layout (from its kind)."""
        if self.has_uninitialized_params():
            saved, name = state_dict.get(prefix + "kind"), prefix.rstrip(".") or "LazyRAA"
            layout = self.channel_dim
            if isinstance(saved, torch.Tensor) and saved.dim() == 1 and saved.numel() == 3:
                layout = int(saved[2]) if layout is None else layout
                _check_kind(saved, torch.tensor([BASES.index(self.base), SHIFTS.index(self.shift), layout]), name)
            weight = state_dict.get(prefix + "weight")
            width = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() > 0 else 0
            self._materialize(width, -1 if layout is None else layout)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _describe(kind: torch.Tensor) -> str:
    """``RAA(base=..., shift=..., channel_dim=...)`` from a ``kind`` buffer."""
    values = kind.tolist() if kind.dim() == 1 and kind.numel() == 3 and not kind.is_floating_point() else None
    if values is None or not (0 <= values[0] < len(BASES) and 0 <= values[1] < len(SHIFTS)):
        return f"an unknown kind {kind.tolist()}"
    return f"RAA(base={BASES[values[0]]!r}, shift={SHIFTS[values[1]]!r}, channel_dim={values[2]})"


def _check_kind(saved, own: torch.Tensor, name: str) -> None:
    if not isinstance(saved, torch.Tensor) or _describe(saved) != _describe(own):
        found = _describe(saved) if isinstance(saved, torch.Tensor) else repr(saved)
        raise DNRTError(f"{name}: the state is of {found}, this module is {_describe(own)}; "
                        "build the model with the activation it was saved with")


def raa_formula(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str,
                shift: str) -> torch.Tensor:
    """RAA as plain operations (erf form), for graphs that are traced, scripted or exported; non-finite input
    as docs/method.md §1 defines it (a non-finite shift gives NaN, x·Φ(z) is 0 where Φ(z) is)."""
    if shift == "elementwise":
        assert w is not None
        return _elementwise_shift(x, w, b, dim, base)
    s = b.to(x.dtype) if w is None else torch.sum(x * w.reshape([-1] + [1] * (-dim - 1)), dim, keepdim=True) + b
    z = x + (s + (s - s))  # in the parameters' precision where x is lower, as the Function does; y is in x's
    if base == "relu":
        return torch.relu(z).to(x.dtype)
    cdf = 0.5 + 0.5 * torch.erf(z * math.sqrt(0.5))  # math.sqrt: TorchScript reads no globals
    return torch.where(cdf == 0, torch.zeros_like(cdf), x * cdf).to(x.dtype)


def _elementwise_shift(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int, base: str) -> torch.Tensor:
    """The d×d ablation form by plain autograd: ``z = x + (Wx + b)`` (it keeps ``z`` too)."""
    moved = x.movedim(dim, -1)
    z = (moved + moved @ weight.to(x.dtype).t() + bias.to(x.dtype)).movedim(-1, dim)
    if base == "relu":
        return torch.relu(z)
    return x * (0.5 + 0.5 * torch.erf(z * math.sqrt(0.5)))
