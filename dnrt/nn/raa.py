"""Response-Adaptive Activation (SPEC §1): ``RAA(x) = x · Φ(x + s)`` or ``max(0, x + s)``, ``s = wᵀx + b``.

One memory-efficient autograd Function (in the spirit of timm's ``activations_me.py``) keeps only ``x``
and the per-vector shift ``s`` for backward and computes the gradients from SPEC §1's formulas. The
math lives in two plain functions; ``dnrt.nn.kernels`` picks single-pass Triton kernels instead on CUDA,
and on request single-pass C++ kernels on the CPU or the same two functions compiled by ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DNRTError
from . import kernels

BASES = ("gelu", "relu")
SHIFTS = ("vector", "scalar", "elementwise")
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _per_vector(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Reshape a length-d vector to broadcast along ``dim`` of a ``dim``-indexed tensor."""
    return t.view((-1,) + (1,) * (-dim - 1)) if dim < 0 else t


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Shifts and parameter gradients accumulate in float32 (float64 for float64 input)."""
    return torch.promote_types(x.dtype, torch.float32)


def _shift(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int) -> torch.Tensor:
    """``s = wᵀx + b`` per feature vector, kept as a size-1 ``dim`` (``b`` alone when ``w`` is None)."""
    acc = _acc_dtype(x)
    if w is None:
        return b.to(acc).reshape((1,) * x.dim())  # not 0-d, which would leave x + s in x's low precision
    return torch.sum(x * _per_vector(w, dim), dim=dim, keepdim=True, dtype=acc) + b.to(acc)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z), in a fresh tensor. Eagerly as GELU(z)/z, CPU's GELU kernel vectorising erf where ``torch.erf``
    does not: 0/0 at z = 0 becomes 0.5, then adding 0·z puts NaN back where z itself is NaN or infinite
    (two cheap in-place passes; a ``z == 0`` mask costs six times more). A compiler gets the erf form."""
    if torch.compiler.is_compiling():
        return 0.5 + 0.5 * torch.erf(z * _SQRT_HALF)
    return F.gelu(z).div_(z).nan_to_num_(nan=0.5).add_(z, alpha=0)


def _grad_pdf(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``grad · φ(z)``; eagerly in place over ``z``, which the caller no longer needs."""
    if torch.compiler.is_compiling():
        return grad * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z.square_().mul_(-0.5).exp_().mul_(grad).mul_(_INV_SQRT_2PI)


def raa_forward(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str):
    """Return ``(y, s)``: the activation and the shift ``s = wᵀx + b``."""
    s = _shift(x, w, b, dim)
    if base == "relu":
        return torch.relu(x + s).to(x.dtype), s
    return _normal_cdf(x + s).mul_(x).to(x.dtype), s


def raa_backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor], dim: int, base: str):
    """Return ``(∂L/∂x, ∂L/∂w, ∂L/∂b)`` by SPEC §1: ``g·Φ(z) + g·x·φ(z) + w·u`` with
    ``u = Σ_c g_c ∂y_c/∂s`` per vector; eagerly a few in-place passes over two fresh tensors."""
    z = x + s
    if base == "relu":
        grad_x = g_pdf_x = grad * (z > 0)
    else:
        grad_x = _normal_cdf(z).mul_(grad)
        g_pdf_x = _grad_pdf(grad, z).mul_(x)
        grad_x.add_(g_pdf_x)
    acc = _acc_dtype(x)
    if w is None:
        return grad_x.to(x.dtype), None, g_pdf_x.sum(dtype=acc)
    u = torch.sum(g_pdf_x, dim=dim, keepdim=True, dtype=acc)
    others = [d for d in range(x.dim()) if d != dim % x.dim()]
    grad_w = torch.sum(x * u, dim=others, dtype=acc) if others else (x * u).to(acc)  # dim=[] would sum all
    return grad_x.addcmul_(u, _per_vector(w, dim)).to(x.dtype), grad_w, u.sum()


class RAAFunction(torch.autograd.Function):
    """RAA with a vector (or scalar, ``w=None``) shift; saves ``x`` and ``s`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str):
        run_forward, ctx.run_backward = kernels.raa_kernels(x, w, dim, base, raa_forward, raa_backward)
        y, s = run_forward(x, w, b, dim, base)
        ctx.save_for_backward(x, s, w)
        ctx.dim, ctx.base, ctx.b_dtype = dim, base, b.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # s is saved without its link to x and w, so a graph of this would be wrong
            raise RuntimeError("dnrt.RAA has no second derivative: backward with create_graph=True is not supported")
        x, s, w = ctx.saved_tensors
        grad_x, grad_w, grad_b = ctx.run_backward(grad.contiguous(), x, s, w, ctx.dim, ctx.base)
        grad_w = None if w is None else grad_w.to(w.dtype)
        return grad_x, grad_w, grad_b.to(ctx.b_dtype).reshape(()), None, None


class RAA(nn.Module):
    """Response-Adaptive Activation: a learnable, input-dependent firing condition (DNRT, ICLR 2024).

    ``base="gelu"``: ``x · Φ(x + s)``; ``base="relu"``: ``max(0, x + s)``. ``shift="vector"``: ``s = wᵀx + b``
    per feature vector (the paper's form); ``"scalar"``: one learned constant; ``"elementwise"``:
    ``s = Wx + b`` with a d×d ``W`` (an ablation). Feature vectors lie along ``channel_dim`` (-1 for
    tokens, 1 for NCHW maps). Every parameter starts at zero, so a fresh RAA is exactly GELU (or ReLU).
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
        self.bias = nn.Parameter(torch.zeros(num_features if shift == "elementwise" else ()))
        if shift == "vector":
            self.weight = nn.Parameter(torch.zeros(num_features))
        elif shift == "elementwise":
            self.weight = nn.Parameter(torch.zeros(num_features, num_features))
        else:
            self.register_parameter("weight", None)

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
        return RAAFunction.apply(x, self.weight, self.bias, dim, self.base)


def raa_formula(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str,
                shift: str) -> torch.Tensor:
    """RAA as plain differentiable operations (erf form), for graphs that are traced, scripted or exported."""
    if shift == "elementwise":
        assert w is not None
        return _elementwise_shift(x, w, b, dim, base)
    s = b.to(x.dtype) if w is None else torch.sum(x * w.reshape([-1] + [1] * (-dim - 1)), dim, keepdim=True) + b
    z = x + s  # in the parameters' precision where x is lower, as the Function does; y is in x's
    if base == "relu":
        return torch.relu(z).to(x.dtype)
    return (x * (0.5 + 0.5 * torch.erf(z * math.sqrt(0.5)))).to(x.dtype)  # math.sqrt: TorchScript reads no globals


def _elementwise_shift(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int, base: str) -> torch.Tensor:
    """The d×d ablation form by plain autograd: ``z = x + (Wx + b)`` (it keeps ``z`` too)."""
    moved = x.movedim(dim, -1)
    z = (moved + moved @ weight.to(x.dtype).t() + bias.to(x.dtype)).movedim(-1, dim)
    if base == "relu":
        return torch.relu(z)
    return x * (0.5 + 0.5 * torch.erf(z * math.sqrt(0.5)))
