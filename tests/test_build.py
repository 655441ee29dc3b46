"""Building the C++ kernels: one line before the first build and no CUDA_HOME warning, concurrent first uses of
one fresh cache, a cached library loaded quietly, ``dnrt build-kernels``, and a machine without a compiler."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USE = """
import math, torch, dnrt
from dnrt.nn.kernels import raa_cpu
torch.manual_seed(0)
m, x = dnrt.RAA(6), torch.randn(4, 6)
with torch.no_grad():
    m.weight.normal_(0, 0.5)
y = m(x)
s = (x * m.weight).sum(-1, keepdim=True) + m.bias
torch.testing.assert_close(y, x * 0.5 * (1 + torch.erf((x + s) / math.sqrt(2))), rtol=1e-5, atol=1e-6)
print("kernels", raa_cpu.available() and torch.ops.dnrt_cpu.raa_capability())
"""
BUILDING = "dnrt: building dnrt's CPU kernels once (~30 s), cached in "


def environment(**changes):
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **changes}


def needs_a_compiler():
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None:
        pytest.skip("the CPU kernels build on x86-64 with a C++ compiler")


def test_concurrent_first_uses_of_a_fresh_cache_build_once_say_so_in_one_line_and_compute(tmp_path):
    """Two processes start on one empty TORCH_EXTENSIONS_DIR at once: torch's lock file lets one build while the
    other waits; both compute correctly. CUDA_HOME set on a machine without CUDA would make torch warn: not here."""
    needs_a_compiler()
    env = environment(TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), CUDA_HOME=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", USE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    done = [(run.wait(timeout=600), run.stdout.read(), run.stderr.read()) for run in runs]
    for code, out, err in done:
        assert code == 0, err[-2000:]
        assert out.startswith("kernels ") and out.split()[1] != "False"
        assert "No CUDA runtime" not in err
        assert len(err.splitlines()) <= 1 and all(line.startswith(BUILDING) for line in err.splitlines())
    assert any(err for _, _, err in done)
    again = subprocess.run([sys.executable, "-c", USE], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr == "" and again.stdout == done[0][1]


def test_build_kernels_builds_both_and_says_where():
    needs_a_compiler()
    done = subprocess.run([sys.executable, "-m", "dnrt", "build-kernels"], env=environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("CPU RAA kernels for ") and lines[1].startswith("CPU memory kernel for ")
    assert all(Path(line.rsplit(": ", 1)[1]).is_file() for line in lines[:2]) and lines[2].startswith("cache: ")
    assert "No CUDA runtime" not in done.stderr


def test_without_a_compiler_one_line_and_plain_pytorch(tmp_path):
    (tmp_path / "bin").mkdir()
    env = environment(PATH=str(tmp_path / "bin"), TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    used = subprocess.run([sys.executable, "-c", USE], env=env, capture_output=True, text=True, timeout=300)
    assert used.returncode == 0, used.stderr[-2000:]
    assert used.stdout == "kernels False\n"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert used.stderr.count("dnrt: the CPU RAA kernels did not build (no C++ compiler (c++) on PATH); "
                                 "using plain PyTorch instead") == 1
        assert BUILDING not in used.stderr
    command = subprocess.run([sys.executable, "-m", "dnrt", "build-kernels"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert command.returncode == 1 and command.stdout == ""
    assert command.stderr.count("\n") == 1 and command.stderr.startswith("error: ")


def test_the_cache_is_keyed_by_the_source_and_its_flags_not_its_place(tmp_path):
    """A library is loaded only for the code it was built from: another checkout of the same source shares it,
    an edited source or other flags get their own."""
    from dnrt.nn.kernels import build

    source = Path(build.__file__).with_name("raa_cpu.cpp")
    copy = tmp_path / "raa_cpu.cpp"
    copy.write_bytes(source.read_bytes())
    flags = build.compile_flags("AVX2")
    name = build.cache_name(source, "AVX2", flags)
    assert build.cache_name(copy, "AVX2", flags) == name and name.startswith("dnrt_raa_cpu_avx2_torch")
    copy.write_bytes(source.read_bytes() + b"\n// edited\n")
    assert build.cache_name(copy, "AVX2", flags) != name
    assert build.cache_name(source, "AVX2", build.compile_flags("AVX512")) != name
