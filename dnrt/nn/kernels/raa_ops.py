"""RAA's forward and backward as PyTorch ops: ``torch.ops.dnrt.raa_forward`` and ``torch.ops.dnrt.raa_backward``.

What ``torch.compile`` and ``torch.export`` trace RAA as (``kernels.raa``; eager calls run the same kernels
through an autograd Function). Each op has a fake (meta) implementation, and the forward an autograd formula
that saves only ``x`` and the shift ``s``. Their kernels: the C++ ones on the CPU and the Triton ones on CUDA
where those apply, the plain math otherwise and on other devices; their outputs are contiguous, as the fakes
say. None reads a device value on the host, so CUDA graphs capture them. ``custom_op`` needs torch 2.4.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import raa_cpu, raa_math

Tensor = torch.Tensor


@torch.library.custom_op("dnrt::raa_forward", mutates_args=())
def raa_forward(x: Tensor, w: Optional[Tensor], b: Tensor, dim: int, base: str) -> Tuple[Tensor, Tensor]:
    """``(y, s)``: RAA of ``x``, and its shift ``s`` shaped as ``x`` with the feature dim of size 1."""
    return raa_math.forward(x.contiguous(), w, b, dim, base)


@torch.library.custom_op("dnrt::raa_backward", mutates_args=())
def raa_backward(grad: Tensor, x: Tensor, s: Tensor, w: Optional[Tensor], dim: int,
                 base: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂x, ∂L/∂w, ∂L/∂b)``, the parameter gradients in float32 (float64 for float64 ``x``);
    ``∂L/∂w`` is empty for the scalar shift (``w=None``)."""
    return _plain_backward(grad, x, s, w, dim, base)


def _plain_backward(grad: Tensor, x: Tensor, s: Tensor, w: Optional[Tensor], dim: int, base: str):
    grad_x, grad_w, grad_b = raa_math.backward(grad.contiguous(), x.contiguous(), s, w, dim, base)
    return grad_x, x.new_empty(0, dtype=grad_b.dtype) if grad_w is None else grad_w, grad_b


@raa_forward.register_kernel("cpu")
def _forward_cpu(x: Tensor, w: Optional[Tensor], b: Tensor, dim: int, base: str):
    if raa_cpu.supports(x, w, base) and raa_cpu.available():
        return raa_cpu.forward(x.contiguous(), w, b, dim, base)  # contiguous, as the fake implementation says
    return raa_math.forward(x.contiguous(), w, b, dim, base)


@raa_backward.register_kernel("cpu")
def _backward_cpu(grad: Tensor, x: Tensor, s: Tensor, w: Optional[Tensor], dim: int, base: str):
    if raa_cpu.supports(x, w, base) and s.dtype == torch.float32 and raa_cpu.available():
        return raa_cpu.backward(grad, x.contiguous(), s, w, dim, base)
    return _plain_backward(grad, x, s, w, dim, base)


def _triton(x: Tensor, w: Optional[Tensor]):
    """RAA's Triton kernels where they apply to ``x``, else None."""
    from . import triton_module

    module = triton_module("raa_triton")
    return module if module is not None and module.supports(x, w) else None


@raa_forward.register_kernel("cuda")
def _forward_cuda(x: Tensor, w: Optional[Tensor], b: Tensor, dim: int, base: str):
    triton = _triton(x, w)
    if triton is not None:
        return triton.forward(x, w, b, dim, base)
    return raa_math.forward(x.contiguous(), w, b, dim, base)


@raa_backward.register_kernel("cuda")
def _backward_cuda(grad: Tensor, x: Tensor, s: Tensor, w: Optional[Tensor], dim: int, base: str):
    triton = _triton(x, w)
    if triton is not None and s.dtype == torch.float32:
        return triton.backward(grad, x, s, w, dim, base)
    return _plain_backward(grad, x, s, w, dim, base)


@raa_forward.register_fake
def _forward_fake(x: Tensor, w: Optional[Tensor], b: Tensor, dim: int, base: str):
    return x.new_empty(x.shape), x.new_empty(raa_math.shift_shape(x, w, dim), dtype=raa_math.acc_dtype(x))


@raa_backward.register_fake
def _backward_fake(grad: Tensor, x: Tensor, s: Tensor, w: Optional[Tensor], dim: int, base: str):
    acc = raa_math.acc_dtype(x)
    return x.new_empty(x.shape), x.new_empty(w.shape if w is not None else (0,), dtype=acc), x.new_empty((), dtype=acc)


def _setup_context(ctx, inputs, output) -> None:
    x, w, b, dim, base = inputs
    ctx.save_for_backward(x, output[1], w)
    ctx.dim, ctx.base, ctx.b_like = dim, base, (b.dtype, b.shape)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad: Tensor, _grad_s: Optional[Tensor]):
    raa_math.check_first_order()
    x, s, w = ctx.saved_tensors
    grad_x, grad_w, grad_b = raa_backward(grad, x, s, w, ctx.dim, ctx.base)
    grad_w = None if w is None else grad_w.to(w.dtype)
    return grad_x, grad_w, grad_b.to(ctx.b_like[0]).reshape(ctx.b_like[1]), None, None


raa_forward.register_autograd(_backward, setup_context=_setup_context)
