"""Fused RAA kernels: the math of ``raa.py`` compiled by ``torch.compile`` (Triton on CUDA, C++ on CPU).

Eager PyTorch runs RAA's formulas as a dozen passes over the tensor where GELU is one fused kernel;
compiling the same two functions makes each direction one or two passes. Compiling costs seconds on
first use (then cached on disk), so it is on by default for CUDA tensors only; ``set_fused`` changes that.
Inside a ``torch.compile``'d model the plain functions run and the outer compiler fuses them.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch

_mode: Union[bool, str] = "auto"


def set_fused(mode: Union[bool, str]) -> None:
    """``True``: always compile RAA's kernels; ``False``: never; ``"auto"``: on CUDA tensors only."""
    global _mode
    if mode not in (True, False, "auto"):
        raise ValueError(f"set_fused takes True, False or 'auto', got {mode!r}")
    _mode = mode


def enabled(x: torch.Tensor) -> bool:
    """Whether RAA on ``x`` runs compiled kernels now."""
    if torch.compiler.is_compiling() or _mode is False:
        return False
    return _mode is True or x.is_cuda


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True)


def forward(fn: Callable, x: torch.Tensor, *args):
    """Run RAA's forward math, compiled when enabled for ``x``."""
    return (_compiled(fn) if enabled(x) else fn)(x, *args)


def backward(fn: Callable, grad: torch.Tensor, x: torch.Tensor, *args):
    """Run RAA's backward math, compiled when enabled for ``x``."""
    return (_compiled(fn) if enabled(x) else fn)(grad, x, *args)
