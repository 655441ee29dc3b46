"""C++ kernels for RAA on the CPU (``raa_cpu.cpp``): one pass over ``x`` forward, one over ``x`` and ``g`` backward.

They cover the common case (GELU base, vector shift, features last, float32, contiguous) and are built on
first use with ``torch.utils.cpp_extension`` for the vector ISA ATen runs (AVX2 or AVX-512), about 10 s,
then cached. Written by hand because inductor's code for the same math spends one more pass on ∂L/∂w and
a second ``exp`` on Φ, which keeps it above 1.5× GELU's time.
"""
from __future__ import annotations

import torch

from .build import load_cpp


def available() -> bool:
    """Whether the kernels are loaded; the first call builds them (a warning says why a build failed)."""
    return load_cpp("raa_cpu.cpp", "CPU RAA kernels", "using torch.compile instead")


def supports(x: torch.Tensor, w, dim: int, base: str) -> bool:
    """Whether ``x`` is a case the kernels cover."""
    return (x.device.type == "cpu" and base == "gelu" and w is not None and dim == -1 and x.is_contiguous()
            and w.is_contiguous() and x.dtype == w.dtype == torch.float32 and x.numel() > 0)


def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dim: int, base: str):
    """Return ``(y, s)`` with ``s`` the float32 per-vector shift, shaped ``[N]``."""
    return torch.ops.dnrt.raa_gelu_forward(x, w, b)


def backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, dim: int, base: str):
    """Return ``(∂L/∂x, ∂L/∂w, ∂L/∂b)`` in float32."""
    return torch.ops.dnrt.raa_gelu_backward(grad, x, s, w)
