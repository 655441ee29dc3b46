"""RAA's plain PyTorch math (docs/method.md §1, §2): the reference every kernel is held to, and the fallback.

Written twice over one structure: eagerly for ATen on the CPU (Φ as GELU(z)/z, whose kernel vectorises erf;
in-place passes over two fresh tensors), and in the erf form, out of place, when a compiler traces it or
``torch.func`` transforms run it (``functional()``); inductor fuses that into one pass each way. Non-finite input as
docs/method.md §1 defines it: a vector whose shift is not finite is NaN; elsewhere ±∞ take their limits.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

Tensor = torch.Tensor
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the hand-written kernels take
NO_SECOND_ORDER = ("dnrt.RAA has no second derivative: its gradient cannot be differentiated again (backward with "
                   "create_graph=True, nested torch.func.grad)")


def check_first_order() -> None:
    """Refuse a graph of RAA's backward: ``s`` is saved without its link to ``x`` and ``w``, so it would be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(NO_SECOND_ORDER)


def per_vector(t: Tensor, dim: int) -> Tensor:
    """Reshape a length-d vector to broadcast along ``dim`` (negative) of a tensor."""
    return t.view((-1,) + (1,) * (-dim - 1)) if dim < 0 else t


def acc_dtype(x: Tensor) -> torch.dtype:
    """Shifts and parameter gradients accumulate in float32 (float64 for float64 input)."""
    return torch.promote_types(x.dtype, torch.float32)


def shift_shape(x: Tensor, w: Optional[Tensor], dim: int) -> Tuple[int, ...]:
    """The shape of ``s``: ``x``'s with the feature dim of size 1, all ones for the scalar shift."""
    if w is None:
        return (1,) * x.dim()
    return tuple(1 if d == dim % x.dim() else size for d, size in enumerate(x.shape))


def _shift(x: Tensor, w: Optional[Tensor], b: Tensor, dim: int) -> Tensor:
    """``s = wᵀx + b`` per feature vector, kept as a size-1 ``dim`` (a copy of ``b`` when ``w`` is None); NaN
    where it is not finite (docs/method.md §1: such a vector has no limit to give)."""
    acc = acc_dtype(x)
    if w is None:
        s = b.to(acc, copy=True).reshape((1,) * x.dim())  # not 0-d, which would leave x + s in x's precision
    else:
        s = torch.sum(x * per_vector(w, dim), dim=dim, keepdim=True, dtype=acc) + b.to(acc)
    return s + (s - s)  # s − s is 0 where s is finite, NaN where it is ±∞ or NaN


def _finite(x: Tensor, both: bool) -> Tensor:
    """``x`` with −∞ (and +∞ where ``both``) replaced by the largest finite values, NaN kept: a factor that is 0
    where x is infinite then gives 0, the limit of x·Φ(z) and x·φ(z) (docs/method.md §1, §2)."""
    big = torch.finfo(x.dtype).max
    return x.clamp(-big, big) if both else x.clamp(min=-big)


def functional() -> bool:
    """Whether a compiler traces this or ``torch.func`` transforms run it: then the erf form, out of place (under
    vmap an in-place op fails where its other operand is batched and it is not; inductor fuses it anyway)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _normal_cdf(z: Tensor) -> Tensor:
    """Φ(z), in a fresh tensor. Eagerly as GELU(z)/z, CPU's GELU kernel vectorising erf where ``torch.erf`` does
    not: ``z`` is first clamped in place to ±40 (where Φ is 0 or 1 in float64 already, so Φ(±∞) is 0 or 1), 0/0
    at z = 0 becomes 0.5, then adding 0·z puts NaN back where z itself is NaN (cheap in-place passes; a
    ``z == 0`` mask costs six times more). Otherwise the erf form."""
    if functional():
        return 0.5 + 0.5 * torch.erf(z * _SQRT_HALF)
    z = z.clamp_(-40.0, 40.0)
    return F.gelu(z).div_(z).nan_to_num_(nan=0.5).add_(z, alpha=0)


def _grad_pdf(grad: Tensor, z: Tensor) -> Tensor:
    """``grad · φ(z)``; eagerly in place over ``z``, which the caller no longer needs."""
    if functional():
        return grad * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z.square_().mul_(-0.5).exp_().mul_(grad).mul_(_INV_SQRT_2PI)


def forward(x: Tensor, w: Optional[Tensor], b: Tensor, dim: int, base: str) -> Tuple[Tensor, Tensor]:
    """Return ``(y, s)``: the activation and the shift ``s = wᵀx + b``."""
    dim = dim % x.dim() - x.dim()
    s = _shift(x, w, b, dim)
    if base == "relu":
        return torch.relu(x + s).to(x.dtype), s
    if functional():
        return (_normal_cdf(x + s) * _finite(x, both=False)).to(x.dtype), s
    return _normal_cdf(x + s).mul_(_finite(x, both=False)).to(x.dtype), s


def backward(grad: Tensor, x: Tensor, s: Tensor, w: Optional[Tensor], dim: int, base: str):
    """Return ``(∂L/∂x, ∂L/∂w, ∂L/∂b)`` by docs/method.md §2: ``g·Φ(z) + g·x·φ(z) + w·u`` with
    ``u = Σ_c g_c ∂y_c/∂s`` per vector (``∂L/∂w`` None for the scalar shift)."""
    dim = dim % x.dim() - x.dim()
    z = x + s
    if base == "relu":
        grad_x = g_pdf_x = grad * (z > 0)
    elif functional():
        g_pdf_x = _grad_pdf(grad, z) * _finite(x, both=True)
        grad_x = _normal_cdf(z) * grad + g_pdf_x
    else:
        grad_x = _normal_cdf(z).mul_(grad)
        g_pdf_x = _grad_pdf(grad, z).mul_(_finite(x, both=True))
        grad_x.add_(g_pdf_x)
    acc = acc_dtype(x)
    if w is None:
        return grad_x.to(x.dtype), None, g_pdf_x.sum(dtype=acc)
    u = torch.sum(g_pdf_x, dim=dim, keepdim=True, dtype=acc)
    others = [d for d in range(x.dim()) if d != dim % x.dim()]
    grad_w = torch.sum(x * u, dim=others, dtype=acc) if others else (x * u).to(acc)  # dim=[] would sum all
    grad_x = grad_x + u * per_vector(w, dim) if functional() else grad_x.addcmul_(u, per_vector(w, dim))
    return grad_x.to(x.dtype), grad_w, u.sum()
