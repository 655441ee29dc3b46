"""Building the C++ kernels: one ``torch.utils.cpp_extension`` build per source file, for the ISA level ATen runs
(x86-64: DEFAULT, AVX2 or AVX-512), cached per level, torch version and content of the source and its flags in
torch's extensions folder (``TORCH_EXTENSIONS_DIR``), so checkouts of other code never share a library. The first
build says so in one line; a cached library loads without the compiler; concurrent first uses wait on torch's
lock file; a failed build warns once. ``dnrt build-kernels`` builds ahead."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch

ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],  # ATen's generic vectors (arrays the compiler vectorises for the baseline x86-64 ISA)
}
SOURCES = {"raa_cpu.cpp": "CPU RAA kernels", "memory_cpu.cpp": "CPU memory kernel"}
_announced = False


def level() -> Optional[str]:
    """The ISA level the kernels are built for here (ATen's, ``ATEN_CPU_CAPABILITY`` chooses it), or None."""
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in ISA_FLAGS or sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return isa


def compiler() -> Optional[str]:
    """The C++ compiler torch's builds call (``$CXX``, else ``c++``), where it is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning: a CPU build needs
    no CUDA, and a CPU-only machine should not be told about it."""
    if "torch.utils.cpp_extension" not in sys.modules:
        logger = logging.getLogger("torch.utils.cpp_extension")
        previous = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import torch.utils.cpp_extension  # noqa: F401
        finally:
            logger.setLevel(previous)
    return sys.modules["torch.utils.cpp_extension"]


def build(source: str) -> Tuple[Path, bool]:
    """Load ``source`` (a file beside this one) as ATen ops, building it first unless a library built from it is
    cached; return the library's path and whether it was built now. Raises where it cannot be built."""
    isa = level()
    if isa is None:
        raise RuntimeError(f"no C++ kernels for ATen's CPU level {torch.backends.cpu.get_cpu_capability()} "
                           f"on {sys.platform}/{platform.machine()}")
    from filelock import FileLock

    extension = cpp_extension()
    code, flags = Path(__file__).with_name(source), compile_flags(isa)
    name = cache_name(code, isa, flags)
    folder = Path(extension._get_build_directory(name, verbose=False))
    library = folder / f"{name}{extension.LIB_EXT}"
    with FileLock(str(folder / "lock")):  # torch's own lock: a build in another process holds it
        cached = library.exists()
    if cached:
        torch.ops.load_library(str(library))
        return library, False
    if compiler() is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    _announce(folder.parent)
    extension.load(name, [str(code)], extra_cflags=flags, is_python_module=False, build_directory=str(folder))
    return library, True


def compile_flags(isa: str) -> list[str]:
    return ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={isa}", *ISA_FLAGS[isa]]


def cache_name(code: Path, isa: str, flags: list[str]) -> str:
    """The cached library's name: the source's stem, the ISA level, torch's version and a digest of the source and
    its flags, so that a library is only ever loaded for the code it was built from (not by modification times,
    which a checkout or an install sets anew)."""
    digest = hashlib.sha256(code.read_bytes() + "\0".join(flags).encode()).hexdigest()[:12]
    return re.sub(r"\W", "_", f"dnrt_{code.stem}_{isa}_torch{torch.__version__}_{digest}").lower()


def _announce(cache: Path) -> None:
    """One line on stderr before the first build of a process, so that its half minute is no silent stall."""
    global _announced
    if not _announced:
        _announced = True
        print(f"dnrt: building dnrt's CPU kernels once (~30 s), cached in {cache} "
              f"(`dnrt build-kernels` builds them ahead of time)", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def load_cpp(source: str, what: str, fallback: str) -> bool:
    """Build (or find built) and load ``source``; False where this machine has no kernels for its CPU, or, with
    one warning naming ``what`` and its ``fallback``, where it cannot build them (no compiler, no ninja, a
    read-only cache)."""
    if level() is None:
        return False
    try:
        build(source)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"dnrt: the {what} did not build ({reason}); {fallback}")
        return False
    return True
