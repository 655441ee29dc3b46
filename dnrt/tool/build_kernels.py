"""`dnrt build-kernels`: build dnrt's C++ CPU kernels now, for CI, container images and cluster jobs that should
not each compile them on first use. They are built for the ISA level ATen runs (set ``ATEN_CPU_CAPABILITY`` to
build another) into torch's extensions folder (``TORCH_EXTENSIONS_DIR``)."""
from __future__ import annotations

import argparse
import time

from dnrt.errors import DNRTError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("`", "")


def run(args: argparse.Namespace) -> int:
    from dnrt.nn.kernels import build

    isa = build.level()
    if isa is None:
        raise DNRTError("dnrt has no C++ kernels for this CPU (x86-64 only); RAA and ARR run in plain PyTorch here")
    for source, what in build.SOURCES.items():
        start = time.perf_counter()
        try:
            library, built = build.build(source)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DNRTError(f"the {what} did not build ({reason}); dnrt runs them in plain PyTorch") from None
        state = f"built in {time.perf_counter() - start:.0f} s" if built else "already built"
        print(f"{what} for {isa}: {state}: {library}")
    print(f"cache: {library.parent.parent} (TORCH_EXTENSIONS_DIR sets it; every process of this machine uses it)")
    return 0
