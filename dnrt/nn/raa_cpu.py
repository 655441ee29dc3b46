"""C++ kernels for RAA on the CPU (``raa_cpu.cpp``): one pass over ``x`` forward, one over ``x`` and ``g`` backward.

They cover the common case (GELU base, vector shift, features last, float32, contiguous) and are built on
first use with ``torch.utils.cpp_extension`` for the vector ISA ATen runs (AVX2 or AVX-512), about 10 s,
then cached. Written by hand because inductor's code for the same math spends one more pass on ∂L/∂w and
a second ``exp`` on Φ, which keeps it above 1.5× GELU's time.
"""
from __future__ import annotations

import functools
import re
import sys
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("raa_cpu.cpp")
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels are loaded; the first call builds them (a warning says why a build failed)."""
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in _ISA_FLAGS or sys.platform == "win32":
        return False
    from torch.utils import cpp_extension

    name = re.sub(r"\W", "_", f"dnrt_raa_cpu_{isa}_torch{torch.__version__}").lower()
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={isa}", *_ISA_FLAGS[isa]]
    try:
        cpp_extension.load(name, [str(_SOURCE)], extra_cflags=flags, is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache: the compiled path still works
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"dnrt: the CPU RAA kernels did not build ({reason}); using torch.compile instead")
        return False
    return True


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
