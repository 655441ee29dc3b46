"""The one place for RAA's and the memory's kernels, and the choice among them.

RAA (``raa``): the hand-written kernels run wherever they apply, the C++ ones of ``raa_cpu`` on the CPU
(built on first use, then cached; a failed build warns once and falls back) and the Triton ones of
``raa_triton`` on CUDA: through the PyTorch ops of ``raa_ops`` (``torch.ops.dnrt.raa_forward`` and
``raa_backward``) where ``torch.compile`` or ``torch.export`` traces them, through one memory-efficient
autograd Function eagerly; CUDA graphs capture either. Elsewhere, and under ``set_fused(False)``, the plain
math of ``raa_math`` runs through that Function, which an outer ``torch.compile`` fuses; so it does under
``torch.func`` transforms (the Function has ``setup_context`` and a generated vmap rule; the kernels have no
batching rule).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType, SimpleNamespace
from typing import Optional, Union

import torch

from . import raa_cpu, raa_math

try:
    from . import raa_ops
except AttributeError:  # torch < 2.4 has no torch.library.custom_op: a compiler then traces the plain math
    raa_ops = None

_mode: Union[bool, str] = "auto"


class set_fused:
    """Choose RAA's kernels. ``"auto"`` (default): the hand-written ones wherever they apply (C++ on the CPU,
    Triton on CUDA), plain PyTorch elsewhere; ``True``: also ``torch.compile`` of the plain math where none
    applies; ``False``: plain PyTorch everywhere. A call, or a context manager that restores the mode before it
    (``with dnrt.set_fused(False): ...``), as ``torch.set_grad_enabled``."""

    def __init__(self, mode: Union[bool, str]) -> None:
        global _mode
        if mode not in (True, False, "auto"):
            raise ValueError(f"set_fused takes True, False or 'auto', got {mode!r}")
        self._previous, _mode = _mode, mode

    def __enter__(self) -> "set_fused":
        return self

    def __exit__(self, *exc_info) -> None:
        global _mode
        _mode = self._previous


@functools.lru_cache(maxsize=None)
def triton_module(name: str) -> Optional[ModuleType]:
    """``dnrt.nn.kernels.<name>``, a module of Triton kernels, or None where Triton is not installed."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


@torch.compiler.assume_constant_result
def _triton_features() -> int:
    """The widest feature vector RAA's Triton kernels take, 0 without Triton; a constant to ``torch.compile``."""
    module = triton_module("raa_triton")
    return 0 if module is None else module.MAX_FEATURES


def _kernel(x: torch.Tensor, w: Optional[torch.Tensor], base: str) -> Optional[str]:
    """``"cpu"`` or ``"triton"`` where a hand-written kernel applies to ``x``, else None."""
    if x.device.type == "cpu":
        return "cpu" if raa_cpu.supports(x, w, base) and raa_cpu.available() else None
    if x.is_cuda and w is not None and x.dtype in raa_math.KERNEL_DTYPES and w.numel() <= _triton_features():
        return "triton"
    return None


def raa(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str) -> torch.Tensor:
    """RAA of ``x`` (docs/method.md §1): ``w`` the shift's weights along ``dim`` (None: scalar shift ``b``),
    ``base`` "gelu" or "relu"; by the fastest implementation that applies. A compiler or ``torch.export``
    gets the ops of ``raa_ops``; eager calls run the same kernels through ``_RAAFunction``, which spares
    the ops' Python dispatch (about 0.1 ms per forward and backward)."""
    if torch._C._are_functorch_transforms_active():  # torch.func: the kernels have no batching rule
        return _RAAFunction.apply(x, w, b, dim, base, "plain")[0]
    kernel = None if _mode is False else _kernel(x, w, base)
    if torch.compiler.is_compiling():
        if kernel is not None and raa_ops is not None:
            return torch.ops.dnrt.raa_forward.default(x, w, b, dim, base)[0]
        return _RAAFunction.apply(x, w, b, dim, base, "plain")[0]
    return _RAAFunction.apply(x, w, b, dim, base, kernel or ("compiled" if _mode is True else "plain"))[0]


@functools.lru_cache(maxsize=None)
def _compiled_math() -> SimpleNamespace:
    """The plain math compiled by ``torch.compile``, for ``set_fused(True)`` where no kernel applies."""
    return SimpleNamespace(forward=torch.compile(raa_math.forward, fullgraph=True),
                           backward=torch.compile(raa_math.backward, fullgraph=True))


def _implementation(name: str):
    """The ``forward``/``backward`` pair named ``name``."""
    if name == "plain":
        return raa_math
    if name == "cpu":
        return raa_cpu
    if name == "triton":
        return triton_module("raa_triton")
    return _compiled_math()


class _RAAFunction(torch.autograd.Function):
    """RAA by the implementation named in its last argument; returns ``(y, s)`` and saves ``x`` and ``s`` only, as
    the ops do. ``setup_context`` and a generated vmap rule let ``torch.func`` (vmap, grad, jacrev) run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: Optional[torch.Tensor], b: torch.Tensor, dim: int, base: str, name: str):
        return _implementation(name).forward(x, w, b, dim, base)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, b, dim, base, name = inputs
        ctx.save_for_backward(x, output[1], w)
        ctx.mark_non_differentiable(output[1])
        ctx.dim, ctx.base, ctx.name, ctx.b_like = dim, base, name, (b.dtype, b.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_s: Optional[torch.Tensor]):
        x, s, w = ctx.saved_tensors
        args = (grad, x, s, w, ctx.dim, ctx.base, ctx.name)
        # With grad mode on (create_graph=True, or torch.func.grad, which always runs backward so), the gradients
        # come from a Function that refuses to be differentiated, so only a real second derivative fails.
        grad_x, grad_w, grad_b = _Backward.apply(*args) if torch.is_grad_enabled() else _Backward.forward(*args)
        grad_w = None if w is None else grad_w.to(w.dtype)
        return grad_x, grad_w, grad_b.to(ctx.b_like[0]).reshape(ctx.b_like[1]), None, None, None


class _Backward(torch.autograd.Function):
    """RAA's backward (docs/method.md §2) as a function of its own, whose derivative is refused: ``s`` is saved
    without its link to ``x`` and ``w``, so a second derivative through it would be silently wrong."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x, s, w, dim: int, base: str, name: str):
        grad_x, grad_w, grad_b = _implementation(name).backward(grad, x, s, w, dim, base)
        return grad_x, grad_b.new_empty(0) if grad_w is None else grad_w, grad_b

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(raa_math.NO_SECOND_ORDER)
