"""C++ kernels for RAA on the CPU (``raa_cpu.cpp``): one pass over ``x`` forward, one over ``x`` and ``g`` backward.

They cover GELU and ReLU bases, the vector and the scalar shift, features last or channels first, float32,
bfloat16 and float16 input (float32 arithmetic), and are built on first use with ``torch.utils.cpp_extension``
for the ISA level ATen runs (x86-64: DEFAULT, AVX2 or AVX-512), 10–25 s, then cached. Written by hand because inductor's
code for the same math spends one more pass on ∂L/∂w and a second ``exp`` on Φ, which keeps it above 1.5×
GELU's time.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import raa_math
from .build import load_cpp

@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernels are loaded; the first call builds them (a warning says why a build failed).
    A constant to ``torch.compile``, which then neither traces nor repeats the build."""
    return load_cpp("raa_cpu.cpp", "CPU RAA kernels", "using plain PyTorch instead") and _register_fakes()


@functools.lru_cache(maxsize=None)
def _register_fakes() -> bool:
    """Fake (meta) implementations of the two ATen ops, so that they trace like the ops of ``raa_ops``
    (torch < 2.4 lacks ``register_fake``; the ops then run eagerly only, through an autograd Function)."""
    if hasattr(torch.library, "register_fake"):
        torch.library.register_fake("dnrt_cpu::raa_forward", _forward_fake)
        torch.library.register_fake("dnrt_cpu::raa_backward", _backward_fake)
    return True


def _forward_fake(x, w, b, dim, gelu):
    return x.new_empty(x.shape), x.new_empty(raa_math.shift_shape(x, w, dim), dtype=torch.float32)


def _backward_fake(grad, x, s, w, dim, gelu):
    width = (0,) if w is None else w.shape
    return x.new_empty(x.shape), x.new_empty(width, dtype=torch.float32), x.new_empty((), dtype=torch.float32)


def supports(x: torch.Tensor, w: Optional[torch.Tensor], base: str) -> bool:
    """Whether ``x`` (and ``w``) is a case the kernels cover; non-contiguous input is copied first."""
    return (x.device.type == "cpu" and x.dtype in raa_math.KERNEL_DTYPES and x.numel() > 0 and base in ("gelu", "relu")
            and (w is None or (w.device.type == "cpu" and w.dim() == 1 and w.is_floating_point())))


def forward(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str):
    """Return ``(y, s)`` with ``s`` the float32 shift, shaped as ``x`` with its feature dim of size 1. A map whose
    features lie last in memory (``channels_last``) runs as rows and keeps its layout; others are made contiguous."""
    if _features_last(x, dim):
        y, s = torch.ops.dnrt_cpu.raa_forward(x.movedim(dim, -1), _float(w), b, -1, base == "gelu")
        return y.movedim(-1, dim), s.movedim(-1, dim)
    return torch.ops.dnrt_cpu.raa_forward(x.contiguous(), _float(w), b, dim, base == "gelu")


def backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, w: Optional[torch.Tensor], dim: int, base: str):
    """Return ``(∂L/∂x, ∂L/∂w, ∂L/∂b)``, the parameter gradients in float32 (``∂L/∂w`` empty for no
    ``w``)."""
    if _features_last(x, dim):
        moved = [t.movedim(dim, -1).contiguous() for t in (grad, x, s)]
        grad_x, grad_w, grad_b = torch.ops.dnrt_cpu.raa_backward(*moved, _float(w), -1, base == "gelu")
        return grad_x.movedim(-1, dim), grad_w, grad_b
    return torch.ops.dnrt_cpu.raa_backward(grad.contiguous(), x.contiguous(), s, _float(w), dim, base == "gelu")


def _features_last(x: torch.Tensor, dim: int) -> bool:
    """Whether ``x`` is not contiguous but is with its feature dim moved last, as a ``channels_last`` map."""
    return not x.is_contiguous() and x.movedim(dim, -1).is_contiguous()


def _float(w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if w is None else w.to(torch.float32).contiguous()
