"""Building the C++ kernels on first use: one ``torch.utils.cpp_extension.load`` per source file, for the
vector ISA ATen itself runs (AVX2 or AVX-512), cached per ISA and torch version; a failed build warns once."""
from __future__ import annotations

import functools
import platform
import re
import sys
import warnings
from pathlib import Path

import torch

ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],  # ATen's generic vectors (arrays the compiler vectorises for the baseline x86-64 ISA)
}


@functools.lru_cache(maxsize=None)
def load_cpp(source: str, what: str, fallback: str) -> bool:
    """Build and load ``source`` (a file beside this one) as ATen ops; False, with one warning naming
    ``what`` and its ``fallback``, where this machine cannot build it (no compiler, no ninja, a read-only cache)."""
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in ISA_FLAGS or sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    from torch.utils import cpp_extension

    stem = Path(source).stem
    name = re.sub(r"\W", "_", f"dnrt_{stem}_{isa}_torch{torch.__version__}").lower()
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={isa}", *ISA_FLAGS[isa]]
    try:
        cpp_extension.load(name, [str(Path(__file__).with_name(source))], extra_cflags=flags, is_python_module=False)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"dnrt: the {what} did not build ({reason}); {fallback}")
        return False
    return True
