"""Triton kernels for RAA with a vector shift: one read of ``x`` forward, one read of ``x`` and ``g`` backward.

The tensor is seen as ``[outer, C, inner]`` (``inner = 1`` for tokens, ``H·W`` for NCHW maps), its feature
vectors as rows ``m = (outer, inner)``. Each program owns a tile of rows with all C features, so the
shift ``s = wᵀx + b`` and ``u = Σ_c g_c ∂y_c/∂s`` are in-register row sums; backward programs loop over
row tiles and keep their share of ``∂L/∂w`` in registers, leaving a few partial sums for one small
``torch.sum``. Written by hand because the compiled equivalent spends several passes where one suffices.
Non-finite input as docs/method.md §1 defines it: a non-finite shift makes its vector NaN.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .raa_math import KERNEL_DTYPES, shift_shape

MAX_FEATURES = 8192


@triton.jit
def _offsets(rows, cols, inner, C):
    outer_idx = rows // inner
    inner_idx = rows % inner
    return (outer_idx * C * inner + inner_idx)[:, None] + cols[None, :] * inner


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, C, inner,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GELU: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = _offsets(rows, cols, inner, C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    s = tl.sum(x * w[None, :], axis=1) + tl.load(b_ptr).to(tl.float32)
    s = s + (s - s)  # NaN where not finite (docs/method.md §1)
    z = x + s[:, None]
    if GELU:
        cdf = 0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476)
        y = tl.where(cdf == 0.0, 0.0, x * cdf)  # 0 where Φ(z) is 0, whatever x: the limit at x = -inf
    else:
        y = tl.where(z < 0.0, 0.0, z)  # keeps NaN, which tl.maximum drops
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, s, mask=rows < M)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, s_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, M, C, inner,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GELU: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & (cols < C)[None, :]
        offs = _offsets(rows, cols, inner, C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + rows, mask=rows < M, other=0.0)
        z = x + s[:, None]
        if GELU:
            e = tl.exp(-0.5 * z * z)
            pdf = g * tl.where(e == 0.0, 0.0, x * e) * 0.3989422804014327
            dx = g * (0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476)) + pdf
        else:
            pdf = tl.where(z > 0, g, 0.0)
            dx = pdf
        u = tl.sum(pdf, axis=1)
        dx = dx + u[:, None] * w[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(x * u[:, None], axis=0)
        db += u
    tl.store(dw_ptr + pid * C + cols, dw, mask=cols < C)
    tl.store(db_ptr + pid, tl.sum(db, axis=0))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _tiling(C: int):
    block_c = triton.next_power_of_2(C)
    return max(1, min(64, 4096 // block_c)), block_c, 4 if block_c <= 2048 else 8


def _shape(x: torch.Tensor, dim: int):
    dim = dim % x.dim()
    C = x.shape[dim]
    inner = 1
    for size in x.shape[dim + 1:]:
        inner *= size
    return x.numel() // C, C, inner


def supports(x: torch.Tensor, w) -> bool:
    """Whether the kernels cover ``x``: a vector shift of at most ``MAX_FEATURES`` and 16 or 32-bit floats."""
    return w is not None and w.numel() <= MAX_FEATURES and x.dtype in KERNEL_DTYPES


def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dim: int, base: str):
    """Return ``(y, s)`` with ``s`` the float32 per-vector shift, shaped as ``x`` with its feature dim of size 1."""
    x = x.contiguous()
    M, C, inner = _shape(x, dim)
    y = torch.empty_like(x)
    s = torch.empty(shift_shape(x, w, dim), device=x.device, dtype=torch.float32)
    block_m, block_c, warps = _tiling(C)
    _forward_kernel[(triton.cdiv(M, block_m),)](x, w, b, y, s, M, C, inner, BLOCK_M=block_m, BLOCK_C=block_c,
                                                GELU=base == "gelu", num_warps=warps)
    return y, s


def backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, dim: int, base: str):
    """Return ``(∂L/∂x, ∂L/∂w, ∂L/∂b)``; the parameter gradients come back in float32."""
    grad, x = grad.contiguous(), x.contiguous()
    M, C, inner = _shape(x, dim)
    dx = torch.empty_like(x)
    block_m, block_c, warps = _tiling(C)
    programs = max(1, min(triton.cdiv(M, block_m), 4 * _multiprocessors(x.device)))
    dw = torch.empty(programs, C, device=x.device, dtype=torch.float32)
    db = torch.empty(programs, device=x.device, dtype=torch.float32)
    _backward_kernel[(programs,)](grad, x, s, w, dx, dw, db, M, C, inner, BLOCK_M=block_m, BLOCK_C=block_c,
                                  GELU=base == "gelu", num_warps=warps)
    return dx, dw.sum(0), db.sum()
