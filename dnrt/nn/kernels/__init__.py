"""The choice of kernels: hand-written Triton on CUDA, hand-written C++ or compiled math on request, or plain PyTorch.

Eager PyTorch runs RAA's formulas as a dozen passes over the tensor where GELU is one kernel. On CUDA
the Triton kernels of ``kernels.raa_triton`` make each direction a single pass. On the CPU ``set_fused(True)``
runs the C++ kernels of ``kernels.raa_cpu`` where they apply (GELU base, vector shift, float32 features last)
and otherwise compiles the very same math of ``raa.py`` with ``torch.compile``; both build on first use,
then are cached on disk. Inside a ``torch.compile``'d model the plain functions run and the outer
compiler fuses them.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Callable, Optional, Union

import torch

from . import raa_cpu

_mode: Union[bool, str] = "auto"


def set_fused(mode: Union[bool, str]) -> None:
    """``"auto"`` (default): Triton kernels on CUDA; ``True``: also C++ or compiled kernels on the CPU and
    other devices; ``False``: plain PyTorch."""
    global _mode
    if mode not in (True, False, "auto"):
        raise ValueError(f"set_fused takes True, False or 'auto', got {mode!r}")
    _mode = mode


@functools.lru_cache(maxsize=None)
def triton_module(name: str) -> Optional[ModuleType]:
    """``dnrt.nn.<name>``, a module of Triton kernels, or None where Triton is not installed."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True)


def raa_kernels(x: torch.Tensor, w: Optional[torch.Tensor], dim: int, base: str, forward: Callable, backward: Callable):
    """The (forward, backward) pair to run RAA on ``x``; ``forward``/``backward`` are the plain math."""
    if _mode is False or torch.compiler.is_compiling():
        return forward, backward
    triton_kernels = triton_module("raa_triton") if x.is_cuda and w is not None and x.is_contiguous() else None
    if triton_kernels is not None and w.numel() <= triton_kernels.MAX_FEATURES:
        return triton_kernels.forward, triton_kernels.backward
    if _mode is True:
        if raa_cpu.supports(x, w, dim, base) and raa_cpu.available():
            return raa_cpu.forward, raa_cpu.backward
        return _compiled(forward), _compiled(backward)
    return forward, backward
