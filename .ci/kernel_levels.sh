#!/usr/bin/env bash
# Runs the given pytest files once per ATen CPU level this CPU can execute (ATEN_CPU_CAPABILITY=default, then avx2,
# then avx512, up to the level ATen picks by itself here), so that a result that holds on one ISA only fails here.
# Usage: .ci/kernel_levels.sh tests/test_raa.py tests/test_kernels.py ...   (PYTHON: the interpreter, default
# .venv/bin/python where it exists, else python3). Each level builds its own C++ kernels once (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
top=$(env -u ATEN_CPU_CAPABILITY "$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
case "$top" in
    AVX512) levels="default avx2 avx512" ;;
    AVX2) levels="default avx2" ;;
    DEFAULT) levels="default" ;;
    *) levels="" ;;  # not x86 (ARM, POWER, s390x): the one level ATen picks there
esac
failed=""
for level in ${levels:-native}; do
    echo "== ATen CPU level: $level (this CPU's own: $top)"
    if [ "$level" = native ]; then
        "$python" -m pytest -q "$@" || failed="$failed $level"
    else
        ATEN_CPU_CAPABILITY=$level "$python" -m pytest -q "$@" || failed="$failed $level"
    fi
done
if [ -n "$failed" ]; then
    echo "kernel tests failed at ATen CPU level(s):$failed" >&2
    exit 1
fi
